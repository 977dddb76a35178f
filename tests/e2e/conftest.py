"""``meshca server`` as a real subprocess, driven the way an operator would."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

READY = re.compile(
    r"gRPC (?P<mode>TLS|plaintext) on [^ ]+:(?P<grpc>\d+); .*HTTP on [^ ]+:(?P<http>\d+)"
)
MESHCA = [sys.executable, "-m", "meshca"]


@dataclass
class ServerProcess:
    process: asyncio.subprocess.Process
    grpc_port: int
    http_port: int
    ready_line: str
    log_path: Path

    def log(self) -> str:
        """What the server wrote to stderr so far (its log)."""
        return self.log_path.read_text(errors="replace")

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode or 0


async def start_meshca(args: Sequence[str], *, env: dict[str, str] | None = None) -> ServerProcess:
    """Start ``meshca server`` and wait (bounded) for its ready line on stdout.

    The server's log (stderr) goes to a file, never to a pipe nobody reads while the
    server runs: a full pipe would block the server mid-test.
    """
    fd, name = tempfile.mkstemp(prefix="meshca-e2e-", suffix=".log")
    with os.fdopen(fd, "wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            *MESHCA,
            "server",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            env={**os.environ, **(env or {})},
        )
    log_path = Path(name)
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
    except TimeoutError:
        process.kill()
        raise
    match = READY.search(line.decode())
    if match is None:
        process.kill()
        await process.wait()
        err = log_path.read_text(errors="replace")
        log_path.unlink()
        raise AssertionError(f"meshca did not start: {line.decode()}{err}")
    return ServerProcess(process, int(match["grpc"]), int(match["http"]), line.decode(), log_path)


async def run_meshca(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run a short ``meshca`` command; return (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        *MESHCA,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()  # e.g. a server that should have refused to start
        await process.wait()
        raise
    return process.returncode or 0, out.decode(), err.decode()


@pytest.fixture
async def processes() -> AsyncIterator[list[ServerProcess]]:
    """Servers a test started; all stopped at the end, whatever happened."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        await server.stop()
        server.log_path.unlink(missing_ok=True)


def worker_pids(pid: int) -> list[int]:
    """Live worker processes of the supervisor ``pid`` (spawned multiprocessing children)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    found = []
    for child in path.read_text().split() if path.exists() else []:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_text()
        except OSError:
            continue
        if "spawn_main" in cmdline and is_running(int(child)):
            found.append(int(child))
    return found


def is_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def loopback_args(state_dir: Path, workers: int = 1) -> list[str]:
    return [
        "--workers",
        str(workers),
        "--state-dir",
        str(state_dir),
        "--grpc-listen",
        "127.0.0.1:0",
        "--grpc-mtls-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]
