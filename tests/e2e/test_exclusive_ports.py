"""One ``meshca server`` per port: a second server (or any other program) on the same
ports is refused, and workers never outlive their supervisor, however it ends."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from meshca.pki.profile import fingerprint
from meshca.supervisor import METRICS_PREFIX, sweep_metrics_dirs
from tests.e2e.conftest import (
    MESHCA,
    ServerProcess,
    is_running,
    run_meshca,
    start_meshca,
    worker_pids,
)
from tests.fakes.kube import FakeKubeApi
from tests.support import create_certificate, load_chain, make_csr, tls_channel, uri_sans

pytestmark = pytest.mark.e2e


def _args(state: Path, grpc: int = 0, http: int = 0, *extra: str, workers: int = 2) -> list[str]:
    return [
        "--workers",
        str(workers),
        "--state-dir",
        str(state),
        "--grpc-listen",
        f"127.0.0.1:{grpc}",
        "--grpc-mtls-listen",
        "off",
        "--http-listen",
        f"127.0.0.1:{http}",
        *extra,
    ]


async def _bundle(port: int) -> bytes:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/v1/bundle") as resp:
            return await resp.read()


async def _chains(server: ServerProcess, kube: FakeKubeApi, connections: int) -> list[list[str]]:
    """One certificate per new connection (each may land on any socket of the port)."""
    root = await _bundle(server.http_port)
    token = kube.mint_token("default", "web")
    chains = []
    for _ in range(connections):
        async with tls_channel(f"127.0.0.1:{server.grpc_port}", root) as channel:
            chains.append(await create_certificate(channel, make_csr(None)[1], token=token))
    return chains


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_second_server_on_the_same_ports_is_refused(
    tmp_path: Path, processes: list[ServerProcess], workers: int
) -> None:
    async with FakeKubeApi() as kube:
        issuer = ("--k8s-oidc-issuer", kube.issuer)
        first = await start_meshca(_args(tmp_path / "a", 0, 0, *issuer, workers=workers))
        processes.append(first)
        other_state = tmp_path / "b"
        code, out, err = await run_meshca(
            "server", *_args(other_state, first.grpc_port, 0, *issuer, workers=workers)
        )
        assert code == 2, (out, err)
        assert "ready" not in out
        assert f"cannot listen for gRPC on 127.0.0.1:{first.grpc_port}: " in err
        # the first server is named as the kernel reports it (it holds the port's lock)
        assert f"@meshca-port-{first.grpc_port}" in err
        assert f"pid {first.process.pid} (" in err and f"of uid {os.geteuid()}" in err
        assert not (other_state / "root-key.pem").exists()  # refused before touching state

        first_root = load_chain([(await _bundle(first.http_port)).decode()])[0]
        for chain in await _chains(first, kube, 20):
            assert fingerprint(load_chain(chain)[-1]) == fingerprint(first_root)


async def test_a_port_another_program_listens_on_is_refused(tmp_path: Path) -> None:
    # SO_REUSEPORT by the same user: the kernel alone would let meshca's workers join.
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        code, out, err = await run_meshca("server", *_args(tmp_path, port, 0, "--plaintext"))
    assert code == 2, (out, err)
    assert f"port {port} is in use by another process (pid {os.getpid()})" in err


async def test_workers_die_with_a_killed_supervisor(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp)}
    async with FakeKubeApi() as kube:
        old = await start_meshca(
            _args(tmp_path / "old", 0, 0, "--k8s-oidc-issuer", kube.issuer), env=env
        )
        processes.append(old)
        workers = worker_pids(old.process.pid)
        assert len(workers) == 2
        assert list(tmp.glob("meshca-metrics-*"))

        old.process.kill()
        await old.process.wait()
        for _ in range(100):  # bounded: they get SIGTERM from the kernel at once
            if not any(is_running(pid) for pid in workers):
                break
            await asyncio.sleep(0.1)
        assert [pid for pid in workers if is_running(pid)] == []
        for _ in range(50):  # the last worker out removes the metrics files
            if not list(tmp.glob("meshca-metrics-*")):
                break
            await asyncio.sleep(0.1)
        # Under load the orphans can all exit before either removes them; the next start
        # sweeps what they left (checked once it is up).
        left_by_orphans = set(tmp.glob("meshca-metrics-*"))

        # The ports are free, and only the new configuration answers on them.
        new = await start_meshca(
            _args(
                tmp_path / "new",
                old.grpc_port,
                old.http_port,
                "--k8s-oidc-issuer",
                kube.issuer,
                "--trust-domain",
                "new.example",
            ),
            env=env,
        )
        processes.append(new)
        for chain in await _chains(new, kube, 20):
            assert uri_sans(load_chain(chain)[0]) == ["spiffe://new.example/ns/default/sa/web"]
        assert left_by_orphans & set(tmp.glob("meshca-metrics-*")) == set()


@pytest.mark.parametrize("workers", [1, 2])
async def test_ctrl_c_during_start_up_is_one_line_and_130(tmp_path: Path, workers: int) -> None:
    interrupted = 0
    for attempt, delay in enumerate((0.3, 0.8, 1.5, 2.5)):
        process = await asyncio.create_subprocess_exec(
            *MESHCA,
            "server",
            *_args(tmp_path / str(attempt), 0, 0, "--plaintext", workers=workers),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, as a shell job has
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
        await asyncio.sleep(delay)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        communicating = asyncio.ensure_future(process.communicate())
        try:
            out, err = await asyncio.wait_for(asyncio.shield(communicating), 30)
        except TimeoutError:
            # Still running 30 s after Ctrl-C: have each process print where it is stuck.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGABRT)
            _, err = await asyncio.wait_for(communicating, 30)
            pytest.fail(f"no exit 30 s after SIGINT at {delay}s; stacks:\n{err.decode()[-8000:]}")
        assert "Traceback" not in err.decode(), (delay, err.decode())
        if "meshca ready" in out.decode():  # started before the signal: a clean stop
            assert process.returncode == 0, err.decode()
        else:
            interrupted += 1
            assert process.returncode == 130, (delay, err.decode())
            assert err.decode().splitlines()[-1] == "meshca: interrupted during start-up"
        for _ in range(50):  # nothing of the process group is left running
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"processes of group {process.pid} still run after the interrupt")
    assert interrupted >= 1, "no signal landed during start-up"


def test_metrics_dirs_of_dead_supervisors_are_swept(tmp_path: Path) -> None:
    with subprocess.Popen(["true"]) as gone:
        gone.wait()
    stale = tmp_path / f"{METRICS_PREFIX}{gone.pid}-x1"
    live = tmp_path / f"{METRICS_PREFIX}{os.getpid()}-x2"
    for directory in (stale, live):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"\0" * 16)
    assert sweep_metrics_dirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("pid", ["99999999999999999999999", "\N{SUPERSCRIPT TWO}", "0"])
def test_a_metrics_dir_whose_pid_no_process_can_have_is_left_alone(
    tmp_path: Path, pid: str
) -> None:
    """Anyone may create names in the temp dir: a pid too large for the kernel, a digit
    int() refuses or pid 0 is no supervisor's; start-up goes on and leaves it."""
    odd = tmp_path / f"{METRICS_PREFIX}{pid}-x1"
    odd.mkdir()
    assert sweep_metrics_dirs(str(tmp_path)) == []
    assert odd.exists()


_WORKER_WITHOUT_PDEATHSIG = """
import ctypes, multiprocessing, os, sys

class RefusingLibc:  # a kernel that refuses PR_SET_PDEATHSIG (EPERM)
    def prctl(self, *args):
        return -1

ctypes.CDLL = lambda *args, **kwargs: RefusingLibc()
ctypes.get_errno = lambda: 1
from meshca.config import Settings
from meshca.supervisor import _worker_main

settings = Settings(state_dir=sys.argv[1], grpc_listen="127.0.0.1:0", http_listen="127.0.0.1:0",
                    grpc_mtls_listen=None, log_level="info")
_, sink = multiprocessing.Pipe(duplex=False)
_worker_main(settings.model_dump_json(), 0, sink, os.getppid())
"""


def test_a_worker_refused_its_parent_death_signal_says_so_in_the_log_format(
    tmp_path: Path,
) -> None:
    """The warning is written after logging is set up, like every other line of the worker
    (time, level, logger), not bare on stderr by Python's last-resort handler."""
    done = subprocess.run(
        [sys.executable, "-c", _WORKER_WITHOUT_PDEATHSIG, str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in done.stderr.splitlines() if "cannot ask for SIGTERM" in line]
    assert len(lines) == 1, done.stderr
    assert re.match(r"\d{4}-\d\d-\d\d \S+ WARNING meshca\.supervisor: cannot ask", lines[0])
    assert "errno 1" in lines[0]
