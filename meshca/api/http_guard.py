"""The HTTP port's defences: a connection cap, a request deadline, quiet client errors.

The HTTP port (bundle, health, readiness, metrics) takes connections from anyone who
can reach it, before any authentication. Without limits, connections that send half a
request stay open for ever, each holding a file descriptor, until the process has none
left for what matters: accepting gRPC callers, opening the database, talking to the
signer. So, per process:

- at most ``max_connections`` HTTP connections are open at once, well below the file
  limit (by default a quarter of ``RLIMIT_NOFILE``, at most 256, after raising the
  soft limit to the hard one), and one peer at most a quarter of them (a peer is an
  IPv4 address, or an IPv6 /64: one host is commonly given a whole /64); a connection
  beyond either is answered ``503``, then closed once the client has closed its side or
  after ``REFUSED_LINGER_SECONDS`` (closing with the request unread would make the kernel
  answer RST, and the client would see "connection reset" instead of the 503);
- a connection must deliver a complete request header within ``idle_timeout`` of
  connecting, and the next one within ``idle_timeout`` of its last response
  (aiohttp's keep-alive timeout), or it is closed;
- a connection whose client stops reading is closed once its answer has waited
  ``idle_timeout`` for room in the socket (nothing is buffered beyond the kernel's
  buffers), so a slow reader of ``/metrics`` cannot hold a descriptor for ever;
- a malformed request is answered ``400`` by aiohttp and counted; it is logged at
  WARNING at most once a minute, without a stack trace, and otherwise at DEBUG.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from meshca.errors import ConfigError
from meshca.metrics import CAMetrics

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 256
FILE_LIMIT_SHARE = 4
"""By default the HTTP port may hold at most 1/4 of the process's file descriptors."""
PEER_SHARE = 4
"""One peer address may hold at most 1/4 of the HTTP connections."""
WARNING_INTERVAL_SECONDS = 60.0
REFUSED_LINGER_SECONDS = 1.0
"""How long a refused connection stays open, reading and dropping what the client sends,
so that the 503 arrives with a FIN rather than an RST."""
REFUSED_LINGER_BYTES = 64 * 1024
IPV6_PEER_PREFIX = 64

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def raise_file_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the soft limit in force.

    Connections, database files and the signer's sockets all count against it, and the
    soft limit is often a small default (1024) far below what the hard limit allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Resolved limits of one process's HTTP port."""

    max_connections: int
    max_per_peer: int
    idle_timeout: timedelta

    @classmethod
    def resolve(
        cls, max_connections: int | None, idle_timeout: timedelta, file_limit: int
    ) -> HttpLimits:
        """Fill in the default cap from ``file_limit``; refuse a cap that would leave the
        rest of the process (gRPC callers, database, signer) less than half the limit."""
        ceiling = max(1, file_limit // 2)
        if max_connections is None:
            cap = max(1, min(DEFAULT_MAX_CONNECTIONS, file_limit // FILE_LIMIT_SHARE))
        elif max_connections > ceiling:
            raise ConfigError(
                f"http_max_connections is {max_connections}; this process may open "
                f"{file_limit} files (RLIMIT_NOFILE) and at most half of them may go to "
                f"HTTP connections, so allowed: 1 to {ceiling}; lower it or raise the "
                "limit (ulimit -n, LimitNOFILE= in the systemd unit)"
            )
        else:
            cap = max_connections
        return cls(cap, max(1, cap // PEER_SHARE), idle_timeout)


def peer_of(host: str) -> str:
    """The key the per-peer cap counts a connection under: an IPv4 address as it is, an
    IPv6 address as its /64 (a host may use any address of its /64; RFC 4291 section
    2.5.1), an IPv4-mapped IPv6 address as the IPv4 address."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PEER_PREFIX), strict=False))
    return str(address)


class _Warnings:
    """One WARNING line per kind and interval; the rest go to DEBUG."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def log(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is None or now - last >= WARNING_INTERVAL_SECONDS:
            self._last[kind] = now
            log.warning(message + " (said at most once a minute)", *args)
        else:
            log.debug(message, *args)


class ConnectionGuard:
    """Counts the HTTP port's connections, refuses those over the caps, and closes those
    that send no complete request in time."""

    def __init__(self, limits: HttpLimits, metrics: CAMetrics) -> None:
        self.limits = limits
        self._metrics = metrics
        self._warnings = _Warnings()
        self._open = 0
        self._per_peer: dict[str, int] = {}
        self._awaiting_first: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}
        self._lingering = 0

    @property
    def open_connections(self) -> int:
        return self._open

    def protocol_factory(
        self, make_handler: Callable[[], asyncio.Protocol]
    ) -> Callable[[], asyncio.Protocol]:
        """Wrap aiohttp's protocol factory (``runner.server``) in this guard."""
        return lambda: _GuardedConnection(self, make_handler)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A request header arrived: the connection has met its first deadline."""
        if request.transport is not None:
            timer = self._awaiting_first.pop(request.transport, None)
            if timer is not None:
                timer.cancel()
        return await handler(request)

    def _admit(self, peer: str) -> str | None:
        """Count a new connection from ``peer``; the refusal reason when over a cap."""
        if self._open >= self.limits.max_connections:
            return "cap"
        if self._per_peer.get(peer, 0) >= self.limits.max_per_peer:
            return "peer_cap"
        self._open += 1
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self._metrics.http_connections.inc()
        return None

    def _release(self, peer: str, transport: asyncio.BaseTransport) -> None:
        timer = self._awaiting_first.pop(transport, None)
        if timer is not None:
            timer.cancel()
        self._open -= 1
        remaining = self._per_peer.get(peer, 1) - 1
        if remaining:
            self._per_peer[peer] = remaining
        else:
            self._per_peer.pop(peer, None)
        self._metrics.http_connections.dec()

    def _refused(self, peer: str, reason: str) -> bytes:
        self._metrics.http_refused.labels(reason).inc()
        limits = self.limits
        if reason == "cap":
            why = f"this process already holds {limits.max_connections} HTTP connections"
        else:
            why = f"{peer} already holds {limits.max_per_peer} HTTP connections"
        self._warnings.log(
            reason, "refusing HTTP connection from %s: %s (http_max_connections)", peer, why
        )
        body = f"503 too many connections: {why}; try again later\n".encode()
        return (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    def _may_linger(self) -> bool:
        """Whether one more refused connection may stay open a moment (see
        REFUSED_LINGER_SECONDS); a flood of refused connections must not hold as many
        descriptors as admitted ones, so at most a quarter of the cap linger at once."""
        if self._lingering >= max(1, self.limits.max_connections // PEER_SHARE):
            return False
        self._lingering += 1
        return True

    def _lingered(self) -> None:
        self._lingering -= 1

    def _watch_first_request(self, transport: asyncio.Transport, peer: str) -> None:
        def expire() -> None:
            if self._awaiting_first.pop(transport, None) is None:
                return
            self._metrics.http_timed_out.inc()
            log.debug(
                "closing HTTP connection from %s: no complete request within %gs",
                peer,
                self.limits.idle_timeout.total_seconds(),
            )
            transport.abort()

        loop = asyncio.get_running_loop()
        self._awaiting_first[transport] = loop.call_later(
            self.limits.idle_timeout.total_seconds(), expire
        )

    def bad_request(self, peer: object, exc: BaseException) -> None:
        """A malformed request (aiohttp answers 400): count it, log one line."""
        self._metrics.http_bad_requests.inc()
        self._warnings.log(
            "bad_request",
            "malformed HTTP request from %s: %s (counted in meshca_http_bad_requests_total)",
            peer,
            _one_line(exc),
        )


class _GuardedConnection(asyncio.Protocol):
    """Stands in front of aiohttp's protocol for one connection, counting it."""

    def __init__(self, guard: ConnectionGuard, make_handler: Callable[[], asyncio.Protocol]):
        self._guard = guard
        self._make_handler = make_handler
        self._inner: asyncio.Protocol | None = None
        self._peer = "-"
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._lingering = False
        self._dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peername = transport.get_extra_info("peername")
        self._peer = peer_of(str(peername[0])) if peername else "-"
        refusal = self._guard._admit(self._peer)
        if refusal is not None:
            self._refuse(transport, refusal)
            return
        self._transport = transport
        # Buffer nothing beyond the kernel's socket buffers: a full one means the client
        # is not reading, and pause_writing starts its deadline.
        transport.set_write_buffer_limits(high=0)
        self._guard._watch_first_request(transport, self._peer)
        self._inner = self._make_handler()
        self._inner.connection_made(transport)

    def _refuse(self, transport: asyncio.Transport, refusal: str) -> None:
        transport.write(self._guard._refused(self._peer, refusal))
        if not self._guard._may_linger():
            transport.close()
            return
        # The 503, then FIN; what the client still sends is read and dropped until it
        # closes its side (or the linger ends), so the kernel has no reason to send RST.
        self._lingering = True
        self._transport = transport
        transport.write_eof()
        self._deadline = asyncio.get_running_loop().call_later(
            REFUSED_LINGER_SECONDS, transport.close
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self._lingering:
            self._guard._lingered()
        if self._inner is None or self._transport is None:
            return
        self._guard._release(self._peer, self._transport)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)
            return
        self._dropped += len(data)  # a refused connection's request, dropped
        if self._dropped > REFUSED_LINGER_BYTES and self._transport is not None:
            self._transport.abort()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is None or self._transport is None:
            return
        self._inner.pause_writing()
        self._deadline = asyncio.get_running_loop().call_later(
            self._guard.limits.idle_timeout.total_seconds(), self._stalled, self._transport
        )

    def _stalled(self, transport: asyncio.Transport) -> None:
        self._guard._metrics.http_timed_out.inc()
        log.debug(
            "closing HTTP connection from %s: it read none of its answer for %gs",
            self._peer,
            self._guard.limits.idle_timeout.total_seconds(),
        )
        transport.abort()

    def resume_writing(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._inner is not None:
            self._inner.resume_writing()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections pass through a :class:`ConnectionGuard`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        *,
        reuse_port: bool = False,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
        )


class ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger, minus the ERROR traceback per malformed request.

    aiohttp logs a request it cannot parse (HttpProcessingError: bad request line,
    header too long, ...) with ``logger.exception``: anyone could fill the log with
    stack traces. Those go to :meth:`ConnectionGuard.bad_request`; everything else
    (a handler's own failure is a bug worth its traceback) passes through unchanged.
    """

    def __init__(self, guard: ConnectionGuard) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self._guard = guard

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            peer = args[0] if args else "-"
            self._guard.bad_request(peer, exc)
            return
        super().log(level, msg, *args, **kwargs)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


def runner_options(guard: ConnectionGuard) -> dict[str, Any]:
    """Keyword arguments for ``web.AppRunner`` that apply the guard's limits."""
    return {
        "access_log": None,
        "keepalive_timeout": guard.limits.idle_timeout.total_seconds(),
        "logger": ProtocolLog(guard),
    }
