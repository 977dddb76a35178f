"""The HTTP port under abuse: half-sent requests, connection floods, malformed requests.

Every test talks to a real CA over raw loopback sockets. Floods come from several
loopback source addresses (127.0.0.2, 127.0.0.3, ...), as several attacking hosts would.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta

import pytest
from aiohttp import web

from meshca.api.http_guard import (
    ConnectionGuard,
    GuardedSite,
    HttpLimits,
    peer_of,
    runner_options,
)
from meshca.errors import ConfigError
from meshca.metrics import CAMetrics
from tests.api.conftest import CA, StartCA
from tests.support import create_certificate, make_csr, uri_sans, verify_with_cryptography

WEB_ID = "spiffe://cluster.local/ns/default/sa/web"
HALF_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: meshca\r\nUser-Ag"

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def connections(
    ca: CA, count: int, *, sources: int = 1, first: int = 2, send: bytes = HALF_REQUEST
) -> AsyncIterator[list[Connection]]:
    """``count`` connections spread over ``sources`` loopback addresses (127.0.0.<first>
    on), each having sent ``send``; all closed on exit."""
    opened: list[Connection] = []
    try:
        for i in range(count):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", ca.server.http_port, local_addr=(f"127.0.0.{first + i % sources}", 0)
            )
            writer.write(send)
            opened.append((reader, writer))
        yield opened
    finally:
        for _, writer in opened:
            writer.close()


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sent before closing; fails if it is still open after ``within``."""
    data = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(4096):
                data += chunk
    except ConnectionResetError:
        pass
    return data


async def still_open(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        async with asyncio.timeout(within):
            return bool(await reader.read(1))
    except TimeoutError:
        return True


def metric(ca: CA, name: str) -> float:
    for line in ca.server.metrics.exposition().decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


async def test_half_sent_requests_are_closed_after_the_idle_timeout(start_ca: StartCA) -> None:
    ca = await start_ca(http_idle_timeout="1s")
    async with connections(ca, 6, sources=3) as held:
        for reader, _ in held:
            assert await closed_by_server(reader, within=10) == b""
    assert metric(ca, "meshca_http_connections_timed_out_total") == 6
    assert (await ca.get("/healthz"))[0] == 200


async def test_a_dribbling_client_does_not_extend_its_deadline(start_ca: StartCA) -> None:
    ca = await start_ca(http_idle_timeout="1s")
    reader, writer = await asyncio.open_connection("127.0.0.1", ca.server.http_port)
    closed = False
    for byte in HALF_REQUEST[:40]:  # one byte per 0.1 s: 4 s in all, the deadline is 1 s
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            closed = True
            break
        await asyncio.sleep(0.1)
    closed = closed or not await still_open(reader, within=5)
    writer.close()
    assert closed


async def test_an_idle_keep_alive_connection_is_closed(start_ca: StartCA) -> None:
    ca = await start_ca(http_idle_timeout="1s")
    request = b"GET /healthz HTTP/1.1\r\nHost: meshca\r\n\r\n"
    async with connections(ca, 1, send=request) as ((reader, _),):
        answer = await closed_by_server(reader, within=10)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok\n")


async def test_a_flood_fills_the_cap_but_not_the_certificate_api(start_ca: StartCA) -> None:
    ca = await start_ca(http_max_connections=8, http_idle_timeout="60s")
    async with AsyncExitStack() as flood:
        # A peer may hold a quarter of the cap: 2 connections each from 127.0.0.2-5.
        held = await flood.enter_async_context(connections(ca, 6, sources=3))
        async with connections(ca, 1) as ((third, _),):  # 127.0.0.2's third
            refused_peer = await closed_by_server(third, within=5)
        held += await flood.enter_async_context(connections(ca, 2, first=5))
        async with connections(ca, 1, first=6) as ((ninth, _),):
            refused_any = await closed_by_server(ninth, within=5)

        # The certificate API answers while the HTTP port is full.
        chain = await create_certificate(
            ca.channel, make_csr(WEB_ID)[1], token=ca.kube.mint_token("default", "web")
        )
        assert uri_sans(verify_with_cryptography(chain)) == [WEB_ID]
        for reader, _ in held:
            assert await still_open(reader, within=0.05)
        assert metric(ca, "meshca_http_connections") == 8

    assert refused_peer.startswith(b"HTTP/1.1 503")
    assert b"127.0.0.2 already holds 2 HTTP connections" in refused_peer
    assert refused_any.startswith(b"HTTP/1.1 503")
    assert b"this process already holds 8 HTTP connections" in refused_any
    # The flood gone, the port serves again.
    for _ in range(100):
        if metric(ca, "meshca_http_connections") == 0:
            break
        await asyncio.sleep(0.05)
    assert (await ca.get("/healthz")) == (200, "ok\n")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: meshca\r\nno colon here\r\n\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: meshca\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
    ],
    ids=["not-http", "header-without-colon", "request-line-too-long", "bad-version"],
)
async def test_malformed_requests_log_no_traceback(
    ca: CA, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    answers = []
    for _ in range(5):
        async with connections(ca, 1, send=request_bytes) as ((reader, _),):
            answers.append(await closed_by_server(reader, within=10))

    assert all(answer.startswith(b"HTTP/1.") and b" 400 " in answer[:20] for answer in answers)
    assert [r for r in caplog.records if r.exc_info] == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert metric(ca, "meshca_http_bad_requests_total") == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) <= 1
    assert all("malformed HTTP request from 127.0.0.2" in w for w in warnings)


def test_the_default_cap_leaves_most_descriptors_to_issuance() -> None:
    ten = timedelta(seconds=10)
    assert HttpLimits.resolve(None, ten, file_limit=1024).max_connections == 256
    assert HttpLimits.resolve(None, ten, file_limit=256).max_connections == 64
    assert HttpLimits.resolve(None, ten, file_limit=256).max_per_peer == 16
    assert HttpLimits.resolve(100, ten, file_limit=256).max_connections == 100
    with pytest.raises(ConfigError) as info:
        HttpLimits.resolve(1000, ten, file_limit=1024)
    assert info.value.message.startswith("http_max_connections is 1000; this process may open 1024")
    assert "allowed: 1 to 512" in info.value.message


async def test_a_refused_client_that_sent_its_request_reads_the_503_then_a_clean_close(
    start_ca: StartCA,
) -> None:
    """A connection refused at the cap has usually sent its request before the server sees
    it: closing it with the request unread makes the kernel send RST (and drop what is not
    yet sent), so a client still writing, or one on another system, gets "connection
    reset" instead of the 503 that says why."""
    ca = await start_ca(http_max_connections=8, http_idle_timeout="60s")  # 2 per peer
    request = b"GET /healthz HTTP/1.1\r\nHost: meshca\r\n\r\n"
    answers = []
    async with connections(ca, 2):  # 127.0.0.2 holds its two connections
        for _ in range(5):
            # Connect and send before the server's loop runs again: the request is in
            # the server's receive buffer when the connection is accepted.
            sock = socket.create_connection(
                ("127.0.0.1", ca.server.http_port), source_address=("127.0.0.2", 0)
            )
            sock.sendall(request)
            reader, writer = await asyncio.open_connection(sock=sock)
            answer = b""
            try:
                async with asyncio.timeout(5):
                    while chunk := await reader.read(4096):
                        answer += chunk
            except ConnectionResetError:
                answer += b"<reset>"
            finally:
                writer.close()
            answers.append(answer)
    assert [a for a in answers if not a.startswith(b"HTTP/1.1 503") or b"<reset>" in a] == []


async def test_a_client_that_stops_reading_its_answers_is_closed(start_ca: StartCA) -> None:
    """Pipelined requests for /metrics whose answers are never read fill the socket buffers:
    the server must not wait for ever to write (holding the connection and its descriptor
    beyond the idle timeout)."""
    ca = await start_ca(http_idle_timeout="1s")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
    sock.bind(("127.0.0.2", 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", ca.server.http_port))
    _, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: meshca\r\n\r\n" * 3000)
        for _ in range(100):  # well past the idle timeout, without reading a byte
            await asyncio.sleep(0.1)
            if metric(ca, "meshca_http_connections") == 0:
                break
        assert metric(ca, "meshca_http_connections") == 0
    finally:
        writer.close()


def test_an_ipv6_peer_is_its_64() -> None:
    """One host may use any address of its /64: counting each address apart would give it
    2^64 times the per-peer share."""
    assert peer_of("2001:db8:1:2::1") == peer_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert peer_of("2001:db8:1:3::1") != peer_of("2001:db8:1:2::1")
    assert peer_of("fe80::1%eth0") == "fe80::/64"
    assert peer_of("::ffff:192.0.2.7") == peer_of("192.0.2.7") == "192.0.2.7"
    assert peer_of("192.0.2.8") != peer_of("192.0.2.7")


async def test_the_per_peer_cap_counts_an_ipv6_peer_by_its_64() -> None:
    guard = ConnectionGuard(HttpLimits(4, 1, timedelta(seconds=10)), CAMetrics())
    runner = web.AppRunner(web.Application(middlewares=[guard.middleware]), **runner_options(guard))
    await runner.setup()
    site = GuardedSite(runner, "::1", 0, guard)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        pytest.skip(f"cannot listen on [::1]: {exc}")
    try:
        port = runner.addresses[0][1]
        _, held = await asyncio.open_connection("::1", port)
        reader, writer = await asyncio.open_connection("::1", port)
        answer = await closed_by_server(reader, within=5)
        writer.close()
        held.close()
    finally:
        await runner.cleanup()
    assert answer.startswith(b"HTTP/1.1 503")
    assert b"::/64 already holds 1 HTTP connections" in answer
