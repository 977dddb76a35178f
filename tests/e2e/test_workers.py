"""``meshca server --workers N``: processes share the ports, each with its own
intermediate, one verified ledger, aggregated metrics, and a dead worker is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import (
    ServerProcess,
    loopback_args,
    run_meshca,
    start_meshca,
    worker_pids,
)
from tests.fakes.kube import FakeKubeApi
from tests.support import create_certificate, load_chain, make_csr, tls_channel

pytestmark = pytest.mark.e2e


async def _get(port: int, path: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
            return await resp.text()


async def _issue_many(server: ServerProcess, kube: FakeKubeApi, count: int) -> set[str]:
    """Issue over several connections; return the issuers' subjects seen."""
    root = (await _get(server.http_port, "/v1/bundle")).encode()
    token = kube.mint_token("default", "web")
    issuers: set[str] = set()
    for _ in range(count // 5):
        # New connections land on either worker (SO_REUSEPORT spreads them).
        async with tls_channel(f"127.0.0.1:{server.grpc_port}", root) as channel:
            chains = await asyncio.gather(
                *(create_certificate(channel, make_csr(None)[1], token=token) for _ in range(5))
            )
        issuers.update(load_chain(c)[1].subject.rfc4514_string() for c in chains)
    return issuers


async def test_workers_share_ports_and_one_ledger(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    state = tmp_path / "state"
    async with FakeKubeApi() as kube:
        server = await start_meshca(
            [
                *loopback_args(state, workers=2),
                "--k8s-oidc-issuer",
                kube.issuer,
                "--rate-limit-per-identity",
                "off",
            ]
        )
        processes.append(server)
        assert "workers 2" in server.ready_line
        # The migrations and the root were prepared in a child: the supervisor itself
        # never loaded the CA's modules (grpcio's extension is a marker), the workers did.
        workers = worker_pids(server.process.pid)
        assert "cygrpc" not in Path(f"/proc/{server.process.pid}/maps").read_text()
        assert all("cygrpc" in Path(f"/proc/{pid}/maps").read_text() for pid in workers)
        issuers = await _issue_many(server, kube, 60)
        assert len(issuers) == 2, "both workers' intermediates should have issued"

        metrics = await _get(server.http_port, "/metrics")
        issued = next(
            line
            for line in metrics.splitlines()
            if line.startswith('meshca_certificates_issued_total{api="istio"')
        )
        assert float(issued.split()[-1]) == 60.0  # summed over both workers

        workers = worker_pids(server.process.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        for _ in range(150):  # bounded: the supervisor restarts it within seconds
            await asyncio.sleep(0.2)
            now = worker_pids(server.process.pid)
            if workers[0] not in now and len(now) == 2:
                break
        now = worker_pids(server.process.pid)
        assert workers[0] not in now and len(now) == 2, now
        await _issue_many(server, kube, 10)
        assert await server.stop() == 0

    code, out, _ = await run_meshca("admin", "ledger", "verify", "--state-dir", str(state))
    assert code == 0 and "ledger OK" in out
