"""Per-request access-log lines on HTTP listeners, access-log reopening, and the limits
(handshake timeout, idle timeout, max connections)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp

from meshca.agent.credentials import CredentialStore
from meshca.proxy.config import Limits
from tests.agent.support import LocalCA
from tests.proxy.conftest import Echo
from tests.proxy.support import (
    BACKEND,
    FRONTEND,
    WAIT,
    client_context,
    config,
    identity_files,
    proxy,
    read_log,
    tls_exchange,
    wait_for_log,
)

LISTEN = "127.0.0.1:0"


async def backend_store(ca: LocalCA) -> CredentialStore:
    store = CredentialStore()
    await ca.publish(store, BACKEND)
    return store


async def test_http_listeners_log_one_line_per_request_on_kept_alive_connections(
    ca: LocalCA, http_app: int, tmp_path: Path
) -> None:
    back_cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{http_app},http",), log_name="b.log")
    front_store = CredentialStore()
    await ca.publish(front_store, FRONTEND)
    async with proxy(back_cfg, await backend_store(ca)) as back:
        await back.wait_ready()
        target = f"127.0.0.1:{back.ports[LISTEN]}"
        front_cfg = config(
            tmp_path, outbound=(f"{LISTEN}={target},{BACKEND},http",), log_name="f.log"
        )
        async with proxy(front_cfg, front_store) as front:
            await front.wait_ready()
            base = f"http://127.0.0.1:{front.ports[LISTEN]}"
            connector = aiohttp.TCPConnector(limit=1)  # one kept-alive connection
            async with aiohttp.ClientSession(connector=connector) as session:
                for path in ("/", "/missing", "/?q=1"):
                    async with session.get(base + path) as resp:
                        await resp.read()
                async with session.post(base + "/", data=b"12345") as resp:
                    await resp.read()
            back_lines = await wait_for_log(
                tmp_path / "b.log", lambda lines: len(lines) == 5, "4 requests + 1 connection"
            )
            front_lines = await wait_for_log(tmp_path / "f.log", lambda lines: len(lines) == 5, "5")
    requests = [line for line in back_lines if "method" in line]
    assert [(r["method"], r["path"], r["status"]) for r in requests] == [
        ("GET", "/", 200),
        ("GET", "/missing", 404),
        ("GET", "/?q=1", 200),
        ("POST", "/", 405),
    ]
    assert all(r["peer_spiffe_id"] == str(FRONTEND) for r in requests)
    assert requests[-1]["bytes_received"] == 5
    assert requests[0]["bytes_sent"] == len("hello from the app\n")
    (conn,) = [line for line in back_lines if "method" not in line]
    assert conn["http_requests"] == 4 and conn["http_note"] is None
    out = [line for line in front_lines if "method" in line]
    assert [r["status"] for r in out] == [200, 404, 200, 405]
    assert all(r["direction"] == "outbound" and r["peer_spiffe_id"] == str(BACKEND) for r in out)
    assert out[-1]["bytes_sent"] == 5  # outbound: sent to the peer = the request body


async def test_the_access_log_is_reopened_after_rotation_and_on_sighup(
    ca: LocalCA, echo: Echo, tmp_path: Path
) -> None:
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",))
    log = tmp_path / "access.log"
    good = identity_files(ca, tmp_path, FRONTEND)
    async with proxy(cfg, await backend_store(ca)) as running:
        await running.wait_ready()
        port = running.ports[LISTEN]
        assert await tls_exchange(port, client_context(good, good.roots)) == b"ping"
        await wait_for_log(log, lambda lines: len(lines) == 1, "first line")
        log.rename(tmp_path / "access.log.1")  # what logrotate does
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while not log.exists():  # reopened by the once-a-second check
            assert loop.time() < deadline, "the access log was not reopened"
            await asyncio.sleep(0.05)
        assert await tls_exchange(port, client_context(good, good.roots)) == b"ping"
        await wait_for_log(log, lambda lines: len(lines) == 1, "a line in the new file")
        log.rename(tmp_path / "access.log.2")
        running.reopen_logs()  # what SIGHUP does
        assert await tls_exchange(port, client_context(good, good.roots)) == b"ping"
        await wait_for_log(log, lambda lines: len(lines) == 1, "a line after SIGHUP")
    assert len(read_log(tmp_path / "access.log.1")) == 1
    assert len(read_log(tmp_path / "access.log.2")) == 1


async def test_handshake_timeout_idle_timeout_and_max_connections(
    ca: LocalCA, echo: Echo, tmp_path: Path
) -> None:
    limits = Limits(handshake_timeout=0.3, idle_timeout=0.3, connect_timeout=1, max_connections=2)
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",), limits=limits)
    good = identity_files(ca, tmp_path, FRONTEND)
    async with proxy(cfg, await backend_store(ca)) as running:
        await running.wait_ready()
        port = running.ports[LISTEN]
        # A client that never starts TLS holds a slot until the handshake timeout.
        silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(silent_reader.read(), WAIT) == b""
        # A TLS client that goes quiet is closed after the idle timeout.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(good, good.roots), server_hostname="proxy"
        )
        writer.write(b"hi")
        assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"hi"
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        # Two open connections fill the limit; the third is closed at once.
        held = [
            await asyncio.open_connection("127.0.0.1", port),
            await asyncio.open_connection("127.0.0.1", port),
        ]
        third_reader, third_writer = await asyncio.open_connection("127.0.0.1", port)
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(third_reader.read(), WAIT) == b""
        for _, w in [*held, (silent_reader, silent_writer), (reader, writer)]:
            w.close()
        third_writer.close()
        lines = await wait_for_log(
            tmp_path / "access.log", lambda lines: len(lines) == 5, "five lines"
        )
    reasons = [line["reason"] for line in lines]
    assert "TLS handshake timed out" in reasons
    assert "idle timeout (0.3s without a byte)" in reasons
    assert "max connections reached (2)" in reasons
