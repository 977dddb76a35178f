"""Peers that try to hold the proxy's resources: each is bounded and closed promptly.

The bounds asserted here are limits of the proxy's own making (several times the value
configured), not performance figures: without them the same connections stay open for
asyncio's 30-second TLS shutdown timeout, or for ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from meshca.agent.credentials import CredentialStore
from meshca.proxy.config import Limits
from tests.agent.support import LocalCA
from tests.proxy.conftest import Echo
from tests.proxy.support import (
    BACKEND,
    FRONTEND,
    INTRUDER,
    WAIT,
    Files,
    client_context,
    config,
    identity_files,
    proxy,
    tls_exchange,
    wait_for_log,
)

LISTEN = "127.0.0.1:0"
CLOSED_WITHIN = 5.0
"""Seconds: far above what the proxy takes (about one), far below asyncio's 30."""


async def backend_store(ca: LocalCA) -> CredentialStore:
    store = CredentialStore()
    await ca.publish(store, BACKEND)
    return store


class MuteClient:
    """A TLS client that completes the handshake, optionally echoes one message, then
    neither reads nor closes: it never answers the proxy's close_notify."""

    def __init__(self, port: int, files: Files, payload: bytes | None) -> None:
        self._release = threading.Event()
        self._ready = threading.Event()
        self.echoed = b""
        self._thread = threading.Thread(target=self._run, args=(port, files, payload))
        self._thread.start()
        assert self._ready.wait(WAIT), "the mute client did not connect"

    def _run(self, port: int, files: Files, payload: bytes | None) -> None:
        ctx = client_context(files, files.roots)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
            tls = ctx.wrap_socket(raw, server_hostname="proxy")
            if payload is not None:
                tls.sendall(payload)
                self.echoed = tls.recv(len(payload))
            self._ready.set()
            self._release.wait(WAIT * 4)
            tls.close()

    def release(self) -> None:
        self._release.set()
        self._thread.join(WAIT)


async def test_refused_and_idle_connections_do_not_wait_for_a_close_notify(
    ca: LocalCA, echo: Echo, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"listeners": {LISTEN: {"allow": [str(FRONTEND)]}}}))
    limits = Limits(handshake_timeout=5, idle_timeout=0.3, connect_timeout=2)
    cfg = config(
        tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",), policy=policy, limits=limits
    )
    async with proxy(cfg, await backend_store(ca)) as running:
        await running.wait_ready()
        port = running.ports[LISTEN]
        intruder = identity_files(ca, tmp_path, INTRUDER)
        frontend = identity_files(ca, tmp_path, FRONTEND)
        loop = asyncio.get_running_loop()
        clients = []
        try:
            started = loop.time()
            clients.append(await asyncio.to_thread(MuteClient, port, intruder, None))
            clients.append(await asyncio.to_thread(MuteClient, port, frontend, b"hi"))
            assert clients[1].echoed == b"hi"
            lines = await wait_for_log(
                tmp_path / "access.log", lambda lines: len(lines) == 2, "both closed"
            )
            assert loop.time() - started < CLOSED_WITHIN, "a mute peer held its connection"
            assert running.state.active == 0
        finally:
            for client in clients:
                await asyncio.to_thread(client.release)
    reasons = sorted(str(line["reason"]) for line in lines)
    assert reasons == ["idle timeout (0.3s without a byte)", f"{INTRUDER} refused by the policy"]


async def test_the_connection_limit_stays_below_the_file_limit(
    ca: LocalCA, echo: Echo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """Each proxied connection holds two descriptors; a limit above what the process may
    open would let a flood exhaust them (accepts pause, upstream connections and new
    credentials fail) before a single connection is refused for the limit."""
    import meshca.proxy.run as run

    monkeypatch.setattr(run, "raise_file_limit", lambda: 1024)
    limits = Limits(max_connections=10_000)
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",), limits=limits)
    with caplog.at_level(logging.WARNING, logger="meshca.proxy.run"):
        async with proxy(cfg, await backend_store(ca)) as running:
            assert running.state.limits.max_connections == (1024 - run.RESERVED_DESCRIPTORS) // 2
    assert "--max-connections 10000 is above what 1024 open files allow" in caplog.text


async def test_one_peer_cannot_hold_every_slot_with_unfinished_handshakes(
    ca: LocalCA, echo: Echo, tmp_path: Path
) -> None:
    """Before its handshake a peer is nobody: one address (an IPv6 /64) may have only
    ``max_handshakes_per_peer`` handshakes in progress; more are closed at once, while
    other addresses and finished handshakes are not affected."""
    limits = Limits(handshake_timeout=5, connect_timeout=2, max_handshakes_per_peer=2)
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",), limits=limits)
    good = identity_files(ca, tmp_path, FRONTEND)
    async with proxy(cfg, await backend_store(ca)) as running:
        await running.wait_ready()
        port = running.ports[LISTEN]
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), WAIT) == b"", "a third one was held"
        writer.close()
        # Another address (any 127/8 address reaches a loopback listener on Linux).
        other = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=client_context(good, good.roots),
            server_hostname="proxy",
            local_addr=("127.0.0.2", 0),
        )
        other[1].write(b"hi")
        assert await asyncio.wait_for(other[0].readexactly(2), WAIT) == b"hi"
        for _, w in silent:
            w.close()
        lines = await wait_for_log(
            tmp_path / "access.log",
            lambda lines: (
                any(line["decision"] == "deny" for line in lines) and running.state.handshakes == {}
            ),
            "the refusal, and the silent ones released",
        )
        # Released: the first address may handshake again.
        again = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(good, good.roots), server_hostname="proxy"
        )
        again[1].write(b"hi")
        assert await asyncio.wait_for(again[0].readexactly(2), WAIT) == b"hi"
        for _, w in (other, again):
            w.close()
    refused = next(line for line in lines if line["decision"] == "deny")
    assert refused["reason"] == "127.0.0.1 already has 2 TLS handshakes in progress"
    assert refused["rule"] == "max handshakes per peer"


async def test_refused_connections_cannot_flood_the_access_log(
    ca: LocalCA, echo: Echo, tmp_path: Path
) -> None:
    """Anyone who can reach the port can make refused connections, each worth a line: past
    ``access_log_refusal_rate`` lines a second the rest are counted, and one line says how
    many were left out. Allowed connections are always logged."""
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",), access_log_refusal_rate=5)
    good = identity_files(ca, tmp_path, FRONTEND)
    attempts = 40
    async with proxy(cfg, await backend_store(ca)) as running:
        await running.wait_ready()
        port = running.ports[LISTEN]
        for _ in range(attempts):  # connect and leave without a handshake
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
        lines = await wait_for_log(
            tmp_path / "access.log",
            lambda lines: (
                sum(line.get("suppressed", 0) for line in lines)
                + sum(line["decision"] == "deny" for line in lines)
                == attempts
            ),
            "every refusal logged or counted",
        )
        assert await tls_exchange(port, client_context(good, good.roots)) == b"ping"
        await wait_for_log(
            tmp_path / "access.log",
            lambda lines: any(line["decision"] == "allow" for line in lines),
            "the allowed connection",
        )
        metrics = running.state.metrics.exposition().decode()
    refused = [line for line in lines if line["decision"] == "deny"]
    summaries = [line for line in lines if line["decision"] == "suppressed"]
    assert len(refused) < attempts / 2, "the refusals were not limited"
    assert summaries and all(
        line["reason"].endswith("refused connections not logged (more than 5 a second)")
        for line in summaries
    )
    suppressed = attempts - len(refused)
    assert f"meshca_proxy_access_log_suppressed_total {float(suppressed)}" in metrics
    assert 'meshca_proxy_connections_total{decision="deny",direction="inbound"} 40.0' in metrics
