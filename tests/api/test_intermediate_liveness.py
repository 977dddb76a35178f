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


async def test_two_cas_in_one_process_keep_their_own_intermediates(tmp_path: Path) -> None:
    """Each CA heartbeats its intermediate and retires the others of its owner: two in
    one process (as tests run replicas) must not take each other's for their own."""
    state_dir = tmp_path / "state"
    settings = load_settings(
        state_dir=state_dir,
        grpc_listen="127.0.0.1:0",
        grpc_mtls_listen="off",
        http_listen="127.0.0.1:0",
    )
    first = await start_server(settings)
    try:
        second = await start_server(settings)
        try:
            assert first.authority.owner != second.authority.owner
            await first.maintain_once()
            await second.maintain_once()
            states = {i["owner"]: i["state"] for i in status(state_dir)["intermediates"]}
            assert states == {first.authority.owner: "in-use", second.authority.owner: "in-use"}
        finally:
            await second.stop(grace=0)
        states = {i["owner"]: i["state"] for i in status(state_dir)["intermediates"]}
        assert states[first.authority.owner] == "in-use"
        assert states[second.authority.owner] == "retired"
    finally:
        await first.stop(grace=0)
