"""The processes the demo starts, and stopping every one of them.

Each child runs in a process group of its own, so Ctrl-C in the terminal reaches the demo
alone, which then stops the children in order: SIGTERM to each group (a CA's worker
processes are in its group), a grace period, then SIGKILL to whatever is left. Output
goes to a log file per child in the demo's directory; the demo reads ready lines there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meshca.errors import MeshcaError

POLL_SECONDS = 0.05
TAIL_LINES = 15


class DemoError(MeshcaError):
    """A demo step failed; ``message`` says which and why (with the child's last lines)."""

    default_reason = "demo_failed"


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, indented, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    last = text.splitlines()[-lines:]
    return "".join(f"\n    | {line}" for line in last)


@dataclass
class Child:
    """A long-running child (the CA, an agent)."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def ready_line(self, prefix: str, timeout: float, *, anywhere: bool = False) -> str:
        """The first line of the log starting with ``prefix`` (holding it, ``anywhere``);
        DemoError if the child exits or does not print it within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                for line in self.log.read_text(errors="replace").splitlines():
                    if line.startswith(prefix) or (anywhere and prefix in line):
                        return line
            if self.process.returncode is not None:
                raise DemoError(
                    f"{self.name} exited (status {self.process.returncode}) before it was "
                    f"ready; its log {self.log} ends:{tail(self.log)}"
                )
            if time.monotonic() > deadline:
                raise DemoError(
                    f"{self.name} was not ready within {timeout:g}s; its log {self.log} "
                    f"ends:{tail(self.log)}"
                )
            await asyncio.sleep(POLL_SECONDS)

    def send(self, sig: signal.Signals) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)


class Children:
    """Starts children with one environment and stops them all, whatever happened."""

    def __init__(self, env: Mapping[str, str], logs: Path) -> None:
        self.env = dict(env)
        self._logs = logs
        self._running: list[asyncio.subprocess.Process] = []

    async def start(self, name: str, argv: Sequence[str]) -> Child:
        """Start a long-running child; its output goes to ``<logs>/<name>.log``."""
        log = self._logs / f"{name}.log"
        with log.open("ab") as out:
            out.write(f"$ {' '.join(argv)}\n".encode())
            out.flush()
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                process_group=0,
            )
        self._running.append(process)
        return Child(name, process, log)

    async def run(self, argv: Sequence[str], timeout: float = 60.0) -> tuple[int, str]:
        """Run a command to its end; (exit status, its output)."""
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            process_group=0,
        )
        self._running.append(process)
        try:
            async with asyncio.timeout(timeout):
                output, _ = await process.communicate()
        except TimeoutError:
            raise DemoError(f"`{' '.join(argv)}` did not finish within {timeout:g}s") from None
        finally:
            if process.returncode is not None:
                self._running.remove(process)
        assert process.returncode is not None
        return process.returncode, output.decode(errors="replace")

    def kill_all(self) -> None:
        """SIGKILL every child's process group at once (a second Ctrl-C)."""
        for process in self._running:
            _signal_group(process, signal.SIGKILL)

    async def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM every child's process group, newest first; SIGKILL the groups of those
        still running after ``grace`` seconds. Returns once every child has been reaped (a
        CA's supervisor reaps its own workers, which also die with it)."""
        for process in reversed(self._running):
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in reversed(self._running):
            left = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.wait_for(process.wait(), left)
            except TimeoutError:
                _signal_group(process, signal.SIGKILL)
                await process.wait()
        self._running.clear()


def _signal_group(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
