"""The demo's application side: a tiny HTTP backend, requests through the proxies, and
the access log read back.

Every request opens a new connection (no keep-alive), so each one goes through a full
mTLS handshake between the proxies: a rotated certificate or trust bundle is in play on
the very next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

REQUEST_TIMEOUT = 5.0
TRAFFIC_INTERVAL = 0.1


async def start_backend() -> tuple[web.AppRunner, int]:
    """An HTTP app on 127.0.0.1 (a port the OS picks) answering every GET."""
    served = 0

    async def hello(request: web.Request) -> web.Response:
        nonlocal served
        served += 1
        return web.Response(text=f"hello from backend (request {served})\n")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port: int = runner.addresses[0][1]
    return runner, port


async def get(port: int, path: str = "/") -> tuple[int, str]:
    """GET ``path`` from 127.0.0.1:``port`` on a new connection: (status, body)."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, (await response.text()).strip()


@dataclass
class Traffic:
    """Requests one after another through the frontend's proxy, counted."""

    port: int
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="meshca-demo-traffic")

    async def _run(self) -> None:
        n = 0
        while True:
            n += 1
            try:
                status, body = await get(self.port, f"/traffic/{n}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failed.append(f"request {n}: {type(exc).__name__}: {exc}")
            else:
                if status == 200:
                    self.ok += 1
                else:
                    self.failed.append(f"request {n}: HTTP {status}: {body[:80]}")
            await asyncio.sleep(TRAFFIC_INTERVAL)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class AccessLog:
    """Reads a proxy's JSON access log from where the last read stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def new_entries(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        entries = []
        for line in complete.splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """At least ``count`` new entries, or what arrived within ``timeout`` seconds."""
        entries: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(entries) < count and loop.time() < deadline:
            entries += self.new_entries()
            await asyncio.sleep(0.05)
        return entries


def describe(entry: dict[str, Any]) -> str:
    """One access-log entry, its telling fields only."""
    parts = [f"peer {entry.get('peer_spiffe_id') or '-'}", f"decision {entry.get('decision')}"]
    if entry.get("method"):
        parts.append(f"{entry['method']} {entry.get('path')} -> {entry.get('status')}")
    if entry.get("reason"):
        parts.append(f"reason: {entry['reason']}")
    elif entry.get("rule"):
        parts.append(f"rule {entry['rule']}")
    if entry.get("peer_serial"):
        parts.append(f"serial {str(entry['peer_serial'])[:12]}")
    if entry.get("tls_version"):
        parts.append(str(entry["tls_version"]))
    return ", ".join(parts)
