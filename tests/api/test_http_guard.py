"""The HTTP port under abuse: half-sent requests, connection floods, malformed requests.

Every test talks to a real CA over raw loopback sockets. Floods come from several
loopback source addresses (127.0.0.2, 127.0.0.3, ...), as several attacking hosts would.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta

import pytest

from meshca.api.http_guard import HttpLimits
from meshca.errors import ConfigError
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
