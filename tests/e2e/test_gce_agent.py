"""End to end: an agent on a "GCE VM" (the fake metadata server) gets a certificate with
the mapped SPIFFE ID from a running CA (real gRPC over TLS on loopback) and renews it;
then ``meshca agent`` as a process, with the shipped VM config, does the same."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from sqlalchemy import text

from meshca.agent.config import load_agent_settings
from meshca.agent.run import RunningAgent, start_agent
from meshca.config import load_settings
from meshca.server import RunningServer, start_server
from tests.fakes.gce import WEB_ID, FakeGoogleCerts, FakeMetadataServer, GceVm, ca_options
from tests.support import uri_sans

REPO = Path(__file__).resolve().parents[2]
WLAPI_CLIENT = REPO / "tests" / "agent" / "wlapi_client.py"
WAIT = 20.0  # upper bound on every wait here, in seconds
READY = re.compile(r"meshca agent ready: (?P<id>\S+) valid until .* HTTP on [^ ]+:(?P<port>\d+)")


@dataclass
class GceCA:
    server: RunningServer
    root_file: Path
    metadata: FakeMetadataServer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def mtls_address(self) -> str:
        return f"127.0.0.1:{self.server.mtls_port}"

    def ledger(self) -> list[tuple[str, str, str]]:
        with self.server.store._engine.connect() as conn:
            rows = conn.execute(
                text("SELECT spiffe_id, auth_method, evidence FROM ledger ORDER BY sequence")
            ).all()
        return [(r[0], r[1], r[2]) for r in rows if r[0] == WEB_ID]

    def auth_failures(self) -> str:
        text_ = self.server.metrics.exposition().decode()
        return "\n".join(line for line in text_.splitlines() if "authentication_failures" in line)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gce-"))  # sun_path holds 107 bytes
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def gce_ca(tmp_path: Path) -> AsyncIterator[GceCA]:
    async with (
        FakeGoogleCerts() as google,
        FakeMetadataServer(google, GceVm()) as metadata,
    ):
        settings = load_settings(
            state_dir=tmp_path / "ca",
            grpc_listen="127.0.0.1:0",
            grpc_mtls_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            **ca_options(google),
        )
        server = await start_server(settings)
        try:
            url = f"http://127.0.0.1:{server.http_port}/v1/bundle"
            async with aiohttp.ClientSession() as session, session.get(url) as resp:
                root = tmp_path / "ca-root.pem"
                root.write_bytes(await resp.read())
            yield GceCA(server, root, metadata)
        finally:
            await server.stop(grace=0)


async def _eventually(check: Any, what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not check():
            await asyncio.sleep(0.05)
    assert check(), what


async def test_agent_gets_and_renews_the_mapped_identity_with_fresh_tokens(
    gce_ca: GceCA, short_dir: Path
) -> None:
    output = short_dir / "certs"
    output.mkdir(mode=0o700)
    settings = load_agent_settings(
        ca_address=gce_ca.address,
        ca_trust_bundle=gce_ca.root_file,
        ca_server_name="localhost",
        credential="gce",
        gce_metadata_url=gce_ca.metadata.url,
        ttl="4s",
        backoff_initial="100ms",
        backoff_max="1s",
        output_dir=output,
        workload_api_socket=short_dir / "wl.sock",
    )
    agent: RunningAgent = await start_agent(settings)
    try:
        first = await asyncio.wait_for(agent.wait_ready(), WAIT)
        assert str(first.spiffe_id) == WEB_ID
        await _eventually(lambda: (c := agent.store.current()) and c.version >= 3, "2 renewals")
        renewed = agent.store.current()
        assert (
            renewed is not None and renewed.chain[0].serial_number != first.chain[0].serial_number
        )
        assert str(renewed.spiffe_id) == WEB_ID

        # Every issuance presented a token of its own, fetched just before.
        rows = gce_ca.ledger()
        assert len(rows) >= 3
        tokens = gce_ca.metadata.tokens
        assert len(set(tokens)) == len(tokens) >= len(rows)
        assert all(method == "gce-iit" for _, method, _ in rows)
        assert "gce:instance-name:web-1" in rows[0][2] and "gce:zone:europe-west1-b" in rows[0][2]
        assert "token_replayed" not in gce_ca.auth_failures()

        leaf = x509.load_pem_x509_certificate((output / "cert-chain.pem").read_bytes())
        assert uri_sans(leaf) == [WEB_ID]
        assert oct((output / "key.pem").stat().st_mode & 0o777) == "0o600"
        fetched = await _py_spiffe_fetch(short_dir / "wl.sock")
        assert fetched["svid"]["spiffe_id"] == WEB_ID
        assert fetched["svid"]["key_matches_leaf"] is True
    finally:
        await agent.stop()


async def _py_spiffe_fetch(socket_path: Path) -> dict[str, Any]:
    """py-spiffe, unchanged, in a subprocess (see tests/agent/wlapi_client.py)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WLAPI_CLIENT),
        "fetch",
        str(socket_path),
        "10",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out.decode().splitlines()[0])
    return result


@pytest.mark.e2e
async def test_meshca_agent_process_with_the_shipped_vm_config(
    gce_ca: GceCA, short_dir: Path
) -> None:
    """deploy/vm/agent.yaml as is, with only the site-specific values overridden the way
    an operator could (MESHCA_AGENT_* variables), as the systemd unit runs it."""
    output = short_dir / "certs"
    output.mkdir(mode=0o700)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")},
        "MESHCA_AGENT_CA_ADDRESS": gce_ca.address,
        "MESHCA_AGENT_MTLS_ADDRESS": gce_ca.mtls_address,
        "MESHCA_AGENT_CA_TRUST_BUNDLE": str(gce_ca.root_file),
        "MESHCA_AGENT_CA_SERVER_NAME": "localhost",
        "MESHCA_AGENT_GCE_METADATA_URL": gce_ca.metadata.url,
        "MESHCA_AGENT_WORKLOAD_API_SOCKET": str(short_dir / "wl.sock"),
        "MESHCA_AGENT_SOCKET_GROUP": grp.getgrgid(os.getgid()).gr_name,
        "MESHCA_AGENT_OUTPUT_DIR": str(output),
        "MESHCA_AGENT_HTTP_LISTEN": "127.0.0.1:0",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshca",
        "agent",
        "--config",
        str(REPO / "deploy" / "vm" / "agent.yaml"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        async with asyncio.timeout(WAIT):
            line = (await process.stdout.readline()).decode()
        match = READY.search(line)
        if match is None:
            process.kill()
            raise AssertionError(
                f"agent not ready: {line!r}\n{(await process.stderr.read()).decode()}"
            )
        assert match["id"] == WEB_ID
        assert "credential gce (GCE identity token (audience spiffe://cluster.local))" in line
        assert gce_ca.metadata.identity_requests == 1
        port = int(match["port"])

        process.send_signal(signal.SIGHUP)  # renew now: with the SVID, on the mTLS port
        metrics = ""
        async with asyncio.timeout(WAIT), aiohttp.ClientSession() as session:
            while 'meshca_agent_renewals_total{via="svid"} 1.0' not in metrics:
                await asyncio.sleep(0.1)
                async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    metrics = await resp.text()
        assert gce_ca.metadata.identity_requests == 1  # no token needed to renew
        assert [m for _, m, _ in gce_ca.ledger()] == ["gce-iit", "x509-svid"]
        leaf = x509.load_pem_x509_certificate((output / "cert-chain.pem").read_bytes())
        assert uri_sans(leaf) == [WEB_ID]

        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            with contextlib.suppress(ProcessLookupError):
                await process.wait()
