"""The agent's health and metrics HTTP server: asyncio and httptools, no web framework.

GET (or HEAD) /healthz    200 while the process is up
GET (or HEAD) /readyz     200 while the agent holds an unexpired certificate, else 503
                          saying why
GET (or HEAD) /metrics    Prometheus text format

An agent runs in every pod, so its memory is multiplied by the pod count: a web
framework would cost more memory than everything else the agent adds to grpcio and
cryptography, for three fixed GET routes. Requests are parsed by httptools (llhttp, the
parser of Node.js); HTTP/1.1 keep-alive is honoured. Anything else is refused with the
reason in the body: another method (405), a request body (413), another path (404), a
request that does not parse (400). A connection is closed after
:data:`IDLE_TIMEOUT` seconds without a complete request, and at most
:data:`MAX_CONNECTIONS` are open at once (more are closed at once), so a slow or
flooding client cannot hold the agent's memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus

import httptools

from meshca.agent.credentials import CredentialStore

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 30.0
"""Seconds a connection may stay open without sending a complete request."""
MAX_CONNECTIONS = 64
MAX_HEAD = 8192
"""Bytes of request line and headers a request may have before it is refused."""

TEXT = b"text/plain; charset=utf-8"
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format 0.0.4 (prometheus_client's CONTENT_TYPE_LATEST)."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    content_type: bytes = TEXT


def readiness(store: CredentialStore) -> Answer:
    """/readyz: ready while the store holds an unexpired certificate; 503 says why not."""
    creds = store.current()
    if creds is None:
        return Answer(503, b"not ready\nno certificate yet\n")
    if creds.not_after <= datetime.now(UTC):
        return Answer(
            503, f"not ready\nthe certificate expired at {creds.not_after.isoformat()}\n".encode()
        )
    return Answer(
        200, f"ready\n{creds.spiffe_id} valid until {creds.not_after.isoformat()}\n".encode()
    )


Routes = dict[bytes, Callable[[], Answer]]


class _Connection(asyncio.Protocol):
    """One client connection: parse requests, answer each in order, close on error."""

    def __init__(self, server: HealthServer) -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._head = 0
        self._body = False
        self._idle: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if len(self._server.connections) >= MAX_CONNECTIONS:
            transport.abort()
            return
        self._server.connections.add(self)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()

    def data_received(self, data: bytes) -> None:
        self._head += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(HTTPStatus.BAD_REQUEST, "protocol upgrades are not served here")
        except httptools.HttpParserError as exc:
            self._refuse(HTTPStatus.BAD_REQUEST, f"not an HTTP/1.1 request: {exc}")
        else:
            if self._head > MAX_HEAD and self._transport is not None:
                self._refuse(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                    f"request head over {MAX_HEAD} bytes",
                )

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body = True

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._head = 0
        method = self._parser.get_method()
        path = self._url.split(b"?", 1)[0]
        route = self._server.routes.get(path)
        if self._body:
            answer = Answer(413, b"a request body is not accepted here\n")
        elif route is None:
            answer = Answer(404, b"not found: this port serves /healthz, /readyz, /metrics\n")
        elif method not in (b"GET", b"HEAD"):
            answer = Answer(405, b"only GET and HEAD are served here\n")
        else:
            answer = route()
        keep = self._parser.should_keep_alive() and answer.status < 400
        self._send(answer, head_only=method == b"HEAD", keep_alive=keep)
        if keep:
            self._arm()
        else:
            transport.close()

    # helpers
    def _send(self, answer: Answer, *, head_only: bool, keep_alive: bool) -> None:
        assert self._transport is not None
        reason = HTTPStatus(answer.status).phrase.encode()
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            answer.status,
            reason,
            answer.content_type,
            len(answer.body),
            b"" if keep_alive else b"Connection: close\r\n",
        )
        self._transport.write(head if head_only else head + answer.body)

    def _refuse(self, status: HTTPStatus, why: str) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._send(Answer(status, f"{why}\n".encode()), head_only=False, keep_alive=False)
        transport.close()

    def _arm(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self._expire)

    def _expire(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


class HealthServer:
    """Serves ``routes`` (path -> answer, computed per request) on one TCP address."""

    def __init__(self, routes: Routes) -> None:
        self.routes = routes
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the bound port. OSError
        when the address cannot be bound."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.connections):
            if conn._transport is not None:
                conn._transport.close()
        await self._server.wait_closed()
        self._server = None
