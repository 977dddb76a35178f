"""The peers bench/agent.py talks to: a ``meshca agent`` subprocess (its /proc readings and
its metrics endpoint), py-spiffe in a subprocess (bench/_agent_wlapi.py), and the
Envoy-like SDS client of tests/agent/sds_client.py (imported from the repository's
``tests`` package, which bench/agent.py puts on ``sys.path``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from _procs import BenchError, cpu_seconds, rss_bytes

from tests.agent.sds_client import EnvoySdsClient, Received


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: each metric name's value, summed over its label sets."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            values[name] = values.get(name, 0.0) + float(value)
    return values


@dataclass
class Agent:
    """A ``meshca agent`` subprocess and its metrics endpoint."""

    proc: subprocess.Popen[bytes]
    argv: list[str]
    http_port: int
    log: Path
    session: aiohttp.ClientSession

    def rss(self) -> int:
        return rss_bytes([self.proc.pid])

    def cpu(self) -> float:
        return cpu_seconds([self.proc.pid])

    async def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        async with asyncio.timeout(10), self.session.get(url) as resp:
            return resp.status, await resp.text()

    async def metrics(self) -> dict[str, float]:
        status, text = await self.get("/metrics")
        if status != 200:
            raise BenchError(f"agent /metrics answered {status}")
        return parse_metrics(text)

    async def wait_ready(self, timeout: float) -> bool:
        """True once /readyz says 200; False if the process exits first."""
        async with asyncio.timeout(timeout):
            while self.proc.poll() is None:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    if (await self.get("/readyz"))[0] == 200:
                        return True
                await asyncio.sleep(0.05)
        return False


class WlapiWatcher:
    """bench/_agent_wlapi.py (py-spiffe) as a subprocess; its events, read on a thread."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.ready_serial: str | None = None
        self.updates: dict[str, float] = {}
        self.errors: list[str] = []
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, name="wlapi-reader", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                event = {"error": f"unreadable line {raw[:200]!r}"}
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._on_event, event)

    def _on_event(self, event: dict[str, Any]) -> None:
        if "error" in event:
            self.errors.append(str(event["error"]))
        elif event.get("event") == "ready":
            self.ready_serial = str(event["serial"])
        elif event.get("event") == "update":
            self.updates.setdefault(str(event["serial"]), float(event["at"]))
        self._changed.set()

    async def wait(self, check: Callable[[], bool], timeout: float) -> bool:
        """Until ``check()`` holds (True) or ``timeout`` passes or the client fails."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not check():
                    if self.errors or self.proc.poll() is not None:
                        return False
                    self._changed.clear()
                    await self._changed.wait()
                return True
        return False

    def stop(self) -> None:
        """Close its stdin: it closes the X509Source and exits."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


def first_arrival(client: EnvoySdsClient, version: int) -> Received | None:
    """The first response holding ``version`` or a later one."""
    for received in client.received:
        if received.version.isdigit() and int(received.version) >= version:
            return received
    return None


async def all_streams_hold(clients: Sequence[EnvoySdsClient], version: int, timeout: float) -> None:
    def holds(client: EnvoySdsClient) -> bool:
        return first_arrival(client, version) is not None

    async with asyncio.timeout(timeout):
        await asyncio.gather(*(c.wait_for(holds, timeout + 1) for c in clients))
