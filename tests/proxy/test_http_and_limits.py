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
        ("GET", "/", 200),  # the query is left out
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


async def _raw_http(port: int, ctx: object, requests: bytes, answers: int) -> bytes:
    """Send ``requests`` as they are; read until ``answers`` responses (or EOF)."""
    import ssl

    assert isinstance(ctx, ssl.SSLContext)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="proxy"
    )
    writer.write(requests)
    got = b""
    while got.count(b"HTTP/1.1 ") < answers:
        chunk = await asyncio.wait_for(reader.read(65536), WAIT)
        if not chunk:
            break
        got += chunk
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
    return got


async def test_request_lines_leave_out_queries_and_credentials_and_bound_the_path(
    ca: LocalCA, http_app: int, tmp_path: Path
) -> None:
    """A query string or a URL's user info may carry a credential (an API key, a token):
    neither is logged. A peer's path is cut at 2048 characters, and whatever it holds
    stays inside one JSON line."""
    from meshca.proxy.http import MAX_LOGGED_PATH

    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{http_app},http",))
    good = identity_files(ca, tmp_path, FRONTEND)
    long_path = "/" + "a" * 5000
    requests = (
        b"GET /pay?token=s3cr3t-token HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET http://alice:s3cr3t-pw@app.local/admin?key=s3cr3t-key HTTP/1.1\r\nHost: x\r\n\r\n"
        + f"GET {long_path}?k=s3cr3t HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        + b"GET /%22%7D%0d%0a%7B%22forged%22:1/caf%C3%A9 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    async with proxy(cfg, await backend_store(ca)) as running:
        await running.wait_ready()
        got = await _raw_http(
            running.ports[LISTEN], client_context(good, good.roots), requests, answers=4
        )
        assert got.count(b"HTTP/1.1 ") == 4
        lines = await wait_for_log(
            tmp_path / "access.log", lambda lines: len(lines) == 5, "4 requests + 1 connection"
        )
    text = (tmp_path / "access.log").read_text()
    assert "s3cr3t" not in text
    assert len(text.splitlines()) == 5
    paths = [line["path"] for line in lines if "path" in line]
    assert paths[0] == "/pay"
    assert paths[1] == "http://app.local/admin"
    assert paths[2] == long_path[:MAX_LOGGED_PATH] and MAX_LOGGED_PATH == 2048
    assert paths[3] == "/%22%7D%0d%0a%7B%22forged%22:1/caf%C3%A9"
    truncated = [line.get("path_truncated", False) for line in lines if "path" in line]
    assert truncated == [False, False, True, False]


async def test_requests_awaiting_an_answer_are_bounded(ca: LocalCA, tmp_path: Path) -> None:
    """A peer that pipelines requests to an application that reads them all but answers
    slowly (or never) must not make the proxy remember each one without bound."""
    from meshca.proxy.http import MAX_PENDING_REQUESTS

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    sink = await asyncio.start_server(swallow, "127.0.0.1", 0)
    sink_port = sink.sockets[0].getsockname()[1]
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{sink_port},http",))
    good = identity_files(ca, tmp_path, FRONTEND)
    try:
        async with proxy(cfg, await backend_store(ca)) as running:
            await running.wait_ready()
            request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            many = request * (MAX_PENDING_REQUESTS + 10)
            _, writer = await asyncio.open_connection(
                "127.0.0.1",
                running.ports[LISTEN],
                ssl=client_context(good, good.roots),
                server_hostname="proxy",
            )
            writer.write(many)
            await writer.drain()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT
            while sum(c.downstream.received for c in running.state.connections) < len(many):
                assert loop.time() < deadline, "the requests were not relayed"
                await asyncio.sleep(0.02)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            (line,) = await wait_for_log(
                tmp_path / "access.log", lambda lines: len(lines) == 1, "1"
            )
    finally:
        sink.close()
    assert line["http_note"] == (
        f"more than {MAX_PENDING_REQUESTS} requests awaiting a response: per-request lines stop"
    )
    assert line["bytes_received"] == len(many)
