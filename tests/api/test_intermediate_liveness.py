"""A running CA vouches for its intermediate; ``admin status`` shows it, and its stop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from meshca.cli.main import main
from meshca.config import load_settings
from meshca.server import start_server


def status(state_dir: Path) -> Any:
    result = CliRunner().invoke(
        main, ["admin", "status", "--state-dir", str(state_dir), "--output", "json"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def test_status_follows_the_servers_intermediate_from_start_to_stop(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    server = await start_server(
        load_settings(
            state_dir=state_dir,
            grpc_listen="127.0.0.1:0",
            grpc_mtls_listen="off",
            http_listen="127.0.0.1:0",
        )
    )
    try:
        running = status(state_dir)
        (inter,) = running["intermediates"]
        assert inter["state"] == "in-use"
        # The CA's own TLS certificate is in the ledger, but not as a workload's.
        counts = running["counts"]
        assert counts["issued_to_workloads"] == 0
        assert counts["ca_server_certificates"] == 1
        first_seen = inter["last_seen_at"]
        await server.maintain_once()
        (after,) = status(state_dir)["intermediates"]
        assert after["last_seen_at"] > first_seen
    finally:
        await server.stop(grace=0)
    (stopped,) = status(state_dir)["intermediates"]
    assert stopped["state"] == "retired" and stopped["retired_at"] is not None
