"""Per-request accounting on listeners declared HTTP/1.1: method, path, status, body bytes.

Requests are parsed from the client's side and responses from the server's side with
httptools (llhttp, the parser of Node.js), fed the chunks the relay forwards anyway; the
bytes themselves are never changed. Responses are matched to requests in order (HTTP/1.1
pipelining keeps the order, RFC 9112 section 9.3.2). ``bytes_received`` / ``bytes_sent``
count body bytes, as Envoy's operators of the same name do for HTTP.

Parsing stops (the bytes still flow, and the connection's own line is still written)
after a protocol upgrade or CONNECT, after a HEAD request (a response to HEAD cannot be
told from its headers alone), on a parse error, or when more than
:data:`MAX_PENDING_REQUESTS` requests await their response (a peer pipelining to an
application that reads faster than it answers); the connection line then says why in
``http_note``.

``path`` is the request target without its query string, and without the user info of
an absolute URL: either may carry a credential (an API key, an access token, a
password), and the log must never hold one (RFC 9110 section 4.2.4 advises against
logging user info). It is cut at :data:`MAX_LOGGED_PATH` characters, with
``path_truncated: true``; only that much of a target is ever kept.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httptools

MAX_LOGGED_PATH = 2048  # characters of a request target kept for the log
MAX_PENDING_REQUESTS = 1000  # requests awaiting their response, per connection


@dataclass(slots=True)
class _Request:
    start_time: str
    started: float
    method: str = ""
    target: str = ""  # at most MAX_LOGGED_PATH + 1 characters
    body: int = 0


def loggable_path(target: str) -> str:
    """``target`` without its query (and fragment), and without the user info of an
    absolute URL (``http://user:password@host/p`` -> ``http://host/p``)."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    scheme, sep, rest = path.partition("://")
    if not sep or "/" in scheme:
        return path
    authority, slash, tail = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{tail}"


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
        current = self._current
        if current is not None and len(current.target) <= MAX_LOGGED_PATH:
            room = MAX_LOGGED_PATH + 1 - len(current.target)
            current.target += url[:room].decode("latin-1")

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
            if len(self._pending) > MAX_PENDING_REQUESTS:
                self._pending.clear()
                self.stop(
                    f"more than {MAX_PENDING_REQUESTS} requests awaiting a response: "
                    "per-request lines stop"
                )

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
        line: dict[str, Any] = {
            "start_time": req.start_time,
            "method": req.method,
            "path": loggable_path(req.target[:MAX_LOGGED_PATH]),
            "status": status,
            "bytes_received": req.body,
            "bytes_sent": body,
            "duration_ms": round((time.monotonic() - req.started) * 1000, 3),
        }
        if len(req.target) > MAX_LOGGED_PATH:
            line["path_truncated"] = True
        self._emit(line)


class _ResponseSide:
    def __init__(self, exchange: HttpExchange) -> None:
        self._exchange = exchange
        self.parser: httptools.HttpResponseParser | None = None

    def on_body(self, body: bytes) -> None:
        self._exchange.response_body(len(body))

    def on_message_complete(self) -> None:
        status = self._exchange._responses.get_status_code()
        self._exchange.response_complete(status)
