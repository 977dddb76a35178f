"""The proxy with real agents and a real CA on loopback: credentials over the Workload API
socket or straight from an in-process agent (``meshca agent --inbound/--outbound``), and
``meshca proxy`` as a process with worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from meshca.agent.run import RunningAgent
from tests.agent.conftest import (  # noqa: F401 (fixtures)
    CA,
    StartCA,
    agents,
    kube,
    settings_for,
    start,
    start_ca,
    write_token,
)
from tests.proxy.conftest import Echo
from tests.proxy.support import (
    WAIT,
    Files,
    client_context,
    config,
    plain_exchange,
    proxy,
    tls_exchange,
    wait_for_log,
)

LISTEN = "127.0.0.1:0"
WEB = "spiffe://cluster.local/ns/default/sa/web"
FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"
INTRUDER = "spiffe://cluster.local/ns/default/sa/intruder"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="pxa-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def agent_for(
    ca: CA, started: list[RunningAgent], workdir: Path, account: str, **options: object
) -> RunningAgent:
    workdir.mkdir(exist_ok=True)
    token = write_token(workdir / "token", ca.kube, account)
    running = await start(started, settings_for(ca, workdir, token_file=token, **options))
    await asyncio.wait_for(running.wait_ready(), WAIT)
    return running


async def test_three_workloads_with_agents_over_the_socket_and_in_process(
    start_ca: StartCA,  # noqa: F811
    agents: list[RunningAgent],  # noqa: F811
    echo: Echo,
    tmp_path: Path,
    sock_dir: Path,
) -> None:
    ca = await start_ca()
    socket_path = sock_dir / "web.sock"
    web = await agent_for(ca, agents, tmp_path / "web", "web", workload_api_socket=socket_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({"listeners": {LISTEN: {"allow": [FRONTEND]}}}))
    back_cfg = config(
        tmp_path,
        inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",),
        policy=policy,
        workload_api_socket=socket_path,
        log_name="web.log",
    )
    async with proxy(back_cfg) as back:  # credentials over the Workload API socket
        await asyncio.wait_for(back.wait_ready(), WAIT)
        target = f"127.0.0.1:{back.ports[LISTEN]}"
        front, intruder = [
            await agent_for(
                ca,
                agents,
                tmp_path / name,
                name,
                outbound=[f"{LISTEN}={target},{WEB}"],
                proxy_access_log=str(tmp_path / f"{name}.log"),
            )
            for name in ("frontend", "intruder")
        ]
        assert front.proxy is not None and intruder.proxy is not None
        await front.proxy.wait_ready()
        await intruder.proxy.wait_ready()
        assert await plain_exchange(front.proxy.ports[LISTEN], b"hello web") == b"hello web"
        assert await plain_exchange(intruder.proxy.ports[LISTEN], b"let me in") == b""
        # The agent renews: the proxy learns it over the socket; new handshakes use it.
        assert back.state.contexts is not None
        first_serial = back.state.contexts.creds.leaf.serial_number
        web.engine.renew_now()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while back.state.contexts.creds.leaf.serial_number == first_serial:
            assert loop.time() < deadline, "the renewed SVID did not reach the proxy"
            await asyncio.sleep(0.05)
        assert await plain_exchange(front.proxy.ports[LISTEN], b"after renewal") == b"after renewal"
        lines = await wait_for_log(tmp_path / "web.log", lambda lines: len(lines) == 3, "3")
    allowed, renewed = [line for line in lines if line["decision"] == "allow"]
    refused = next(line for line in lines if line["decision"] == "deny")
    (out, *_) = await wait_for_log(tmp_path / "frontend.log", lambda lines: len(lines) == 2, "2")
    assert renewed["peer_spiffe_id"] == FRONTEND
    assert out["peer_serial"] == format(first_serial, "x")
    assert allowed["peer_spiffe_id"] == FRONTEND and allowed["local_spiffe_id"] == WEB
    assert allowed["peer_address"] == "127.0.0.1"
    assert refused["peer_spiffe_id"] == INTRUDER
    assert refused["rule"] == f"default deny: no allow rule of {LISTEN} matches"
    assert out["peer_spiffe_id"] == WEB and out["local_spiffe_id"] == FRONTEND
    assert echo.accepted == 2
    assert "mTLS proxy outbound" in front.status_line()


def children_of(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc), zombies excluded."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # multiprocessing's resource tracker is a child too: count only the workers.
        cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        if int(fields[1]) == pid and fields[0] != "Z" and b"resource_tracker" not in cmdline:
            found.append(int(entry))
    return found


async def readyz(port: int) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/readyz") as resp,
    ):
        return resp.status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.e2e
async def test_meshca_proxy_with_two_workers_serves_and_stops_cleanly(
    start_ca: StartCA,  # noqa: F811
    agents: list[RunningAgent],  # noqa: F811
    echo: Echo,
    tmp_path: Path,
    sock_dir: Path,
) -> None:
    ca = await start_ca()
    socket_path = sock_dir / "web.sock"
    client_agent = await agent_for(ca, agents, tmp_path / "frontend", "frontend")
    creds = client_agent.store.current()
    assert creds is not None
    files = Files(tmp_path, "frontend", creds.private_key, creds.chain, creds.bundle)
    http_port = free_port()
    log = tmp_path / "access.log"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshca",
        "proxy",
        "--workload-api-socket",
        str(socket_path),
        "--inbound",
        f"{LISTEN}=127.0.0.1:{echo.port}",
        "--workers",
        "2",
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--access-log",
        str(log),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        # Started before the agent: up, but not ready, and saying why.
        async with aiohttp.ClientSession() as session:
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{http_port}/readyz") as resp:
                        status, text = resp.status, await resp.text()
                        break
                except aiohttp.ClientConnectionError:
                    assert asyncio.get_running_loop().time() < deadline, "no health port"
                    await asyncio.sleep(0.1)
        assert status == 503
        assert text == "not ready\n2 worker(s) without a certificate yet\n"
        await agent_for(ca, agents, tmp_path / "web", "web", workload_api_socket=socket_path)
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith(f"meshca proxy ready: {WEB} valid until"), line
        assert line.rstrip().endswith("; 2 workers"), line
        match = re.search(r"\(port (\d+)\)", line)
        assert match, line
        port = int(match.group(1))
        for _ in range(20):  # connections spread over both workers
            try:
                got = await tls_exchange(port, client_context(files, files.roots))
            except ConnectionError as exc:
                raise AssertionError(f"{exc!r}; access log: {log.read_text()}") from None
            assert got == b"ping"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{http_port}/readyz") as resp:
                assert resp.status == 200
            async with session.get(f"http://127.0.0.1:{http_port}/metrics") as resp:
                metrics = await resp.text()
        lines = await wait_for_log(log, lambda lines: len(lines) == 20, "20 lines")
        assert all(entry["peer_spiffe_id"] == FRONTEND for entry in lines)
        allowed = 'meshca_proxy_connections_total{decision="allow",direction="inbound"} 20.0'
        assert allowed in metrics
        # SIGHUP (as logrotate's postrotate sends it) reopens the access log in every worker.
        log.rename(tmp_path / "access.log.1")
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        for _ in range(4):
            assert await tls_exchange(port, client_context(files, files.roots)) == b"ping"
        await wait_for_log(log, lambda lines: len(lines) == 4, "4 lines in the reopened log")
        # A worker that dies is replaced; the proxy is ready again once it has its SVID.
        workers = children_of(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            now = children_of(proc.pid)
            if len(now) == 2 and workers[0] not in now and await readyz(http_port) == 200:
                break
            assert loop.time() < deadline, f"the worker was not replaced: {now}"
            await asyncio.sleep(0.2)
        for _ in range(10):
            assert await tls_exchange(port, client_context(files, files.roots)) == b"ping"
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0
