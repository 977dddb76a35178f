"""Per-request accounting on listeners declared HTTP/1.1: method, path, status, body bytes.

Requests are parsed from the client's side and responses from the server's side with
httptools (llhttp, the parser of Node.js), fed the chunks the relay forwards anyway; the
bytes themselves are never changed. Responses are matched to requests in order (HTTP/1.1
pipelining keeps the order, RFC 9112 section 9.3.2). ``bytes_received`` / ``bytes_sent``
count body bytes, as Envoy's operators of the same name do for HTTP.

Parsing stops (the bytes still flow, and the connection's own line is still written)
after a protocol upgrade or CONNECT, after a HEAD request (a response to HEAD cannot be
told from its headers alone), or on a parse error; the connection line then says why in
``http_note``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httptools


@dataclass(slots=True)
class _Request:
    start_time: str
    started: float
    method: str = ""
    path: str = ""
    body: int = 0


class HttpExchange:
    """Feeds both directions of one connection; calls ``emit`` once per completed exchange."""

    def __init__(self, emit: Callable[[dict[str, Any]], None]) -> None:
        self._emit = emit
        self._pending: deque[_Request] = deque()
        self._current: _Request | None = None
        self._response_body = 0
        self.note: str | None = None
        self.requests = 0
        self._requests = httptools.HttpRequestParser(self)
        self._responses = httptools.HttpResponseParser(_ResponseSide(self))

    @property
    def active(self) -> bool:
        return self.note is None

    def stop(self, note: str) -> None:
        if self.note is None:
            self.note = note

    def from_client(self, data: bytes) -> None:
        if self.note is not None:
            return
        try:
            self._requests.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.stop("protocol upgrade: per-request lines stop")
        except httptools.HttpParserError as exc:
            self.stop(f"request not parsed as HTTP/1.1 ({exc}): per-request lines stop")

    def from_server(self, data: bytes) -> None:
        if self.note is not None:
            return
        try:
            self._responses.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.stop("protocol upgrade: per-request lines stop")
        except httptools.HttpParserError as exc:
            self.stop(f"response not parsed as HTTP/1.1 ({exc}): per-request lines stop")

    # httptools request callbacks
    def on_message_begin(self) -> None:
        self._current = _Request(datetime.now(UTC).isoformat(), time.monotonic())

    def on_url(self, url: bytes) -> None:
        if self._current is not None:
            self._current.path += url.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._current is not None:
            self._current.method = self._requests.get_method().decode("latin-1")
            if self._current.method in ("HEAD", "CONNECT"):
                self.stop(f"{self._current.method} request: per-request lines stop")

    def on_body(self, body: bytes) -> None:
        if self._current is not None:
            self._current.body += len(body)

    def on_message_complete(self) -> None:
        if self._current is not None:
            self._pending.append(self._current)
            self._current = None

    # response side
    def response_body(self, size: int) -> None:
        self._response_body += size

    def response_complete(self, status: int) -> None:
        body, self._response_body = self._response_body, 0
        if 100 <= status < 200:
            return  # an interim response; the final one follows
        if not self._pending:
            self.stop("a response without a request: per-request lines stop")
            return
        req = self._pending.popleft()
        self.requests += 1
        self._emit(
            {
                "start_time": req.start_time,
                "method": req.method,
                "path": req.path,
                "status": status,
                "bytes_received": req.body,
                "bytes_sent": body,
                "duration_ms": round((time.monotonic() - req.started) * 1000, 3),
            }
        )


class _ResponseSide:
    def __init__(self, exchange: HttpExchange) -> None:
        self._exchange = exchange
        self.parser: httptools.HttpResponseParser | None = None

    def on_body(self, body: bytes) -> None:
        self._exchange.response_body(len(body))

    def on_message_complete(self) -> None:
        status = self._exchange._responses.get_status_code()
        self._exchange.response_complete(status)
