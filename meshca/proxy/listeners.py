"""Inbound and outbound listeners: one :class:`Connection` per accepted socket.

Inbound (X509-SVID spec 5, "validation"): accept plain TCP, run the TLS handshake with
the current server context (client certificate required, chained to the current bundle),
check the peer's SVID, apply the policy, connect to the application, then relay. A peer
refused after the handshake has its connection closed before any byte reaches the
application; the access-log line names the reason or the policy rule.

Outbound: accept the application's plain connection, connect to the remote, run the TLS
handshake with the current client context, check that the server's SPIFFE ID is one of
the expected ones, then relay; nothing the application sent is forwarded before that.

The connection's task is the request boundary: whatever goes wrong there is logged as an
``error`` line and the connection closed, never left to the event loop's handler.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from meshca.api.http_guard import peer_of
from meshca.proxy.accesslog import AccessLog
from meshca.proxy.config import Inbound, Limits, Outbound
from meshca.proxy.http import HttpExchange
from meshca.proxy.metrics import ProxyMetrics
from meshca.proxy.policy import PolicyFile
from meshca.proxy.relay import Leg
from meshca.proxy.tls import (
    PeerIdentity,
    PeerRefusedError,
    TlsContexts,
    check_peer,
    handshake_failure,
)

log = logging.getLogger(__name__)

NOT_READY = "not ready: no certificate from the agent yet"
REFUSAL_LINGER_SECONDS = 0.25
CLOSE_GRACE_SECONDS = 1.0  # a connection the proxy ends waits this long for close_notify
ACCEPT_BATCH = 64  # connections accepted per wake-up of a listener
ACCEPT_PAUSE_SECONDS = 0.1  # a refused peer's bytes are read and dropped this long


@dataclass
class ProxyState:
    """What every connection of one process reads: the current TLS contexts and so on."""

    policy: PolicyFile
    access_log: AccessLog
    limits: Limits
    metrics: ProxyMetrics
    contexts: TlsContexts | None = None
    active: int = 0
    connections: set[Connection] = field(default_factory=set)
    handshakes: dict[str, int] = field(default_factory=dict)  # in progress, by peer


class _Refused(Exception):  # noqa: N818 (control flow, not an error)
    def __init__(self, decision: str, rule: str | None, reason: str) -> None:
        super().__init__(reason)
        self.decision, self.rule, self.reason = decision, rule, reason


def _address(addr: object) -> tuple[str | None, int | None]:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), int(addr[1])
    return None, None


class Connection:
    """One proxied connection: its legs, its handshake, its access-log line."""

    def __init__(
        self,
        state: ProxyState,
        direction: str,
        listener: str,
        http: bool,
        sock: socket.socket,
    ) -> None:
        self.state = state
        self.direction = direction
        self.listener = listener
        self.http = http
        self.sock: socket.socket | None = sock  # until a transport owns it
        self.start_time = datetime.now(UTC)
        self.started = time.monotonic()
        self.downstream = Leg(self)
        self.upstream: Leg | None = None
        self.record: dict[str, Any] = {}
        self.decision = "error"
        self.rule: str | None = None
        self.reason: str | None = None
        self.exchange: HttpExchange | None = None
        self._working = True
        self._logged = False
        self._idle: asyncio.TimerHandle | None = None
        self._handshaking: str | None = None  # the peer key counted in state.handshakes

    # life cycle -------------------------------------------------------------------
    def start(
        self,
        run: Callable[[Connection], Coroutine[Any, Any, None]],
        handshake_peer: str | None = None,
    ) -> None:
        """Count the connection and start its task, or refuse it over a limit: the
        connection limit, or (``handshake_peer``: the peer key of an inbound connection)
        the handshakes that peer has in progress."""
        self.state.active += 1
        self.state.connections.add(self)
        limits = self.state.limits
        refusal: tuple[str, str | None, str] | None = None
        if self.state.active > limits.max_connections:
            refusal = ("error", None, f"max connections reached ({limits.max_connections})")
        elif handshake_peer is not None:
            pending = self.state.handshakes.get(handshake_peer, 0)
            if pending >= limits.max_handshakes_per_peer:
                refusal = (
                    "deny",
                    "max handshakes per peer",
                    f"{handshake_peer} already has {pending} TLS handshakes in progress",
                )
            else:
                self.state.handshakes[handshake_peer] = pending + 1
                self._handshaking = handshake_peer
        if refusal is not None:
            self._working = False
            self.decision, self.rule, self.reason = refusal
            self._close_socket()
            self._maybe_finish()
            return
        task = asyncio.get_running_loop().create_task(run(self))
        task.add_done_callback(self._task_done)

    def handshake_over(self) -> None:
        """The handshake ended (either way): the peer's count goes down."""
        peer, self._handshaking = self._handshaking, None
        if peer is None:
            return
        left = self.state.handshakes.get(peer, 1) - 1
        if left > 0:
            self.state.handshakes[peer] = left
        else:
            self.state.handshakes.pop(peer, None)

    def _close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._working = False
        self.handshake_over()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("proxy connection failed unexpectedly", exc_info=exc)
            self.decision, self.reason = "error", f"internal error: {type(exc).__name__}: {exc}"
            self.downstream.abort()
            if self.upstream is not None:
                self.upstream.abort()
        self._close_socket()
        self._maybe_finish()

    def leg_lost(self, leg: Leg, exc: Exception | None) -> None:
        if exc is not None and self.reason is None and self.decision == "allow":
            self.reason = f"connection ended by an error: {exc}"
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._logged or self._working:
            return
        legs = [self.downstream] + ([self.upstream] if self.upstream is not None else [])
        if not all(leg.closed or leg.transport is None for leg in legs):
            return
        self._logged = True
        if self._idle is not None:
            self._idle.cancel()
        self.state.active -= 1
        self.state.connections.discard(self)
        self._write_line()

    # relay helpers ------------------------------------------------------------------
    def relay(self, client: Leg, server: Leg) -> None:
        """Join the legs; ``client`` carries requests, ``server`` responses."""
        if self.http:
            self.exchange = HttpExchange(self._write_request_line)
            client.observer = self.exchange.from_client
            server.observer = self.exchange.from_server
        client.join(server)
        self.decision = "allow"
        idle = self.state.limits.idle_timeout
        if idle > 0:
            self._idle = asyncio.get_running_loop().call_later(idle, self._check_idle)

    def _check_idle(self) -> None:
        legs = [self.downstream, self.upstream]
        if any(leg is not None and leg.active for leg in legs):
            for leg in legs:
                if leg is not None:
                    leg.active = False
            self._idle = asyncio.get_running_loop().call_later(
                self.state.limits.idle_timeout, self._check_idle
            )
            return
        self.reason = f"idle timeout ({self.state.limits.idle_timeout:g}s without a byte)"
        self.downstream.close_within(CLOSE_GRACE_SECONDS)
        if self.upstream is not None:
            self.upstream.close_within(CLOSE_GRACE_SECONDS)

    async def connect_upstream(self, host: str, port: int) -> Leg:
        leg = Leg(self)
        self.upstream = leg
        loop = asyncio.get_running_loop()
        timeout = self.state.limits.connect_timeout
        try:
            await asyncio.wait_for(loop.create_connection(lambda: leg, host, port), timeout)
        except TimeoutError:
            leg.closed = True
            raise _Refused(
                "error", self.rule, f"upstream {host}:{port} did not answer within {timeout:g}s"
            ) from None
        except OSError as exc:
            leg.closed = True
            detail = os.strerror(exc.errno) if exc.errno else str(exc)
            raise _Refused("error", self.rule, f"upstream {host}:{port}: {detail}") from None
        return leg

    async def accept_plain(self) -> Leg:
        """Hand the accepted socket to a plain transport (the outbound application side)."""
        loop = asyncio.get_running_loop()
        sock, self.sock = self.sock, None
        assert sock is not None
        await loop.connect_accepted_socket(lambda: self.downstream, sock)
        return self.downstream

    async def accept_tls(self, ctx: ssl.SSLContext) -> PeerIdentity:
        """The server-side handshake on the accepted socket, then the X509-SVID checks."""
        loop = asyncio.get_running_loop()
        sock, self.sock = self.sock, None
        assert sock is not None
        handshake = loop.connect_accepted_socket(
            lambda: self.downstream,
            sock,
            ssl=ctx,
            ssl_handshake_timeout=self.state.limits.handshake_timeout,
        )
        try:
            return await self._checked(self.downstream, handshake, sock)
        finally:
            self.handshake_over()

    async def connect_tls(self, host: str, port: int, ctx: ssl.SSLContext) -> PeerIdentity:
        """Connect to the remote (connect timeout), then the client-side handshake and the
        X509-SVID checks."""
        loop = asyncio.get_running_loop()
        leg = self.upstream = Leg(self)
        timeout = self.state.limits.connect_timeout
        sock: socket.socket | None = None
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout
            )
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(loop.sock_connect(sock, address), timeout)
        except TimeoutError:
            leg.closed = True
            if sock is not None:
                sock.close()
            raise _Refused(
                "error", self.rule, f"upstream {host}:{port} did not answer within {timeout:g}s"
            ) from None
        except OSError as exc:
            leg.closed = True
            if sock is not None:
                sock.close()
            detail = os.strerror(exc.errno) if exc.errno else str(exc)
            raise _Refused("error", self.rule, f"upstream {host}:{port}: {detail}") from None
        self.record["peer_address"], self.record["peer_port"] = _address(sock.getpeername())
        handshake = loop.create_connection(
            lambda: leg,
            sock=sock,
            ssl=ctx,
            server_hostname=host,
            ssl_handshake_timeout=self.state.limits.handshake_timeout,
        )
        return await self._checked(leg, handshake, sock)

    async def _checked(
        self,
        leg: Leg,
        handshake: Awaitable[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]],
        sock: socket.socket,
    ) -> PeerIdentity:
        try:
            transport, _ = await handshake
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            self.state.metrics.handshake_failures.labels(self.direction).inc()
            leg.closed = True
            sock.close()
            raise _Refused("deny", "mtls handshake", handshake_failure(exc)) from None
        ssl_object = transport.get_extra_info("ssl_object")
        assert ssl_object is not None
        cipher = ssl_object.cipher()
        self.record.update(
            tls_version=ssl_object.version(), tls_cipher=cipher[0] if cipher else None
        )
        try:
            peer = check_peer(ssl_object.getpeercert(binary_form=True), self._trust_domain())
        except PeerRefusedError as exc:
            self.state.metrics.handshake_failures.labels(self.direction).inc()
            raise _Refused("deny", "x509-svid", exc.reason) from None
        self.record.update(
            peer_spiffe_id=str(peer.spiffe_id),
            peer_serial=peer.serial,
            peer_not_after=peer.not_after.isoformat(),
        )
        return peer

    def _trust_domain(self) -> Any:
        assert self.state.contexts is not None
        return self.state.contexts.creds.trust_domain

    def contexts(self) -> TlsContexts:
        ctxs = self.state.contexts
        if ctxs is None:
            raise _Refused("error", None, NOT_READY)
        self.record["local_spiffe_id"] = str(ctxs.creds.spiffe_id)
        return ctxs

    def refused(self, exc: _Refused) -> None:
        self.decision, self.reason = exc.decision, exc.reason
        if exc.rule is not None:
            self.rule = exc.rule
        self.downstream.shut(REFUSAL_LINGER_SECONDS, CLOSE_GRACE_SECONDS)
        if self.upstream is not None:
            self.upstream.close_within(CLOSE_GRACE_SECONDS)

    # access log -----------------------------------------------------------------------
    def _base(self) -> dict[str, Any]:
        return {
            "start_time": self.start_time.isoformat(),
            "direction": self.direction,
            "listener": self.listener,
            "peer_spiffe_id": None,
            "peer_address": None,
            "peer_port": None,
            "local_spiffe_id": None,
            "peer_serial": None,
            "peer_not_after": None,
            "tls_version": None,
            "tls_cipher": None,
            **self.record,
        }

    def _write_line(self) -> None:
        inbound = self.direction == "inbound"
        received = self.downstream.received if inbound else (self.upstream_received())
        sent = self.upstream_received() if inbound else self.downstream.received
        line = {
            **self._base(),
            "decision": self.decision,
            "rule": self.rule,
            "reason": self.reason,
            "bytes_received": received,
            "bytes_sent": sent,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
        }
        if self.exchange is not None:
            line["http_requests"] = self.exchange.requests
            line["http_note"] = self.exchange.note
        self.state.metrics.connections.labels(self.direction, self.decision).inc()
        self.state.metrics.bytes.labels(self.direction, "received").inc(received)
        self.state.metrics.bytes.labels(self.direction, "sent").inc(sent)
        if self.decision == "allow":
            self.state.access_log.write(line)
        elif not self.state.access_log.write_refusal(line):
            self.state.metrics.log_suppressed.inc()

    def upstream_received(self) -> int:
        return self.upstream.received if self.upstream is not None else 0

    def _write_request_line(self, request: dict[str, Any]) -> None:
        line = {**self._base(), "decision": self.decision, "rule": self.rule, **request}
        if self.direction == "outbound":  # the peer is the server: swap the directions
            line["bytes_received"], line["bytes_sent"] = (
                request["bytes_sent"],
                request["bytes_received"],
            )
        self.state.metrics.requests.labels(self.direction).inc()
        self.state.access_log.write(line)


async def _run_inbound(conn: Connection, spec: Inbound) -> None:
    try:
        ctxs = conn.contexts()
        peer = await conn.accept_tls(ctxs.server)
        client = conn.downstream
        decision = conn.state.policy.decide(spec.listen, peer.spiffe_id)
        conn.rule = decision.rule
        if not decision.allowed:
            raise _Refused("deny", decision.rule, f"{peer.spiffe_id} refused by the policy")
        server = await conn.connect_upstream(*spec.app)
        if client.closed:
            server.close()
            raise _Refused("error", conn.rule, "the peer left before the application answered")
        conn.relay(client, server)
    except _Refused as exc:
        conn.refused(exc)


async def _run_outbound(conn: Connection, spec: Outbound) -> None:
    try:
        app = await conn.accept_plain()
        ctxs = conn.contexts()
        peer = await conn.connect_tls(*spec.remote, ctxs.client)
        for pattern in spec.expected:
            if pattern.matches(peer.spiffe_id):
                conn.rule = f"expected {pattern}"
                break
        else:
            expected = ", ".join(str(p) for p in spec.expected)
            raise _Refused(
                "deny",
                "expected spiffe id",
                f"the server is {peer.spiffe_id}; expected: {expected}",
            )
        assert conn.upstream is not None
        if app.closed:
            raise _Refused("error", conn.rule, "the application left during the handshake")
        conn.relay(app, conn.upstream)
    except _Refused as exc:
        conn.refused(exc)


Acceptor = Callable[[socket.socket, object], None]


def inbound_acceptor(state: ProxyState, spec: Inbound) -> Acceptor:
    def accept(sock: socket.socket, addr: object) -> None:
        conn = Connection(state, "inbound", spec.listen, spec.http, sock)
        host, conn.record["peer_port"] = _address(addr)
        conn.record["peer_address"] = host
        conn.start(lambda c: _run_inbound(c, spec), peer_of(host or "-"))

    return accept


def outbound_acceptor(state: ProxyState, spec: Outbound) -> Acceptor:
    def accept(sock: socket.socket, addr: object) -> None:
        conn = Connection(state, "outbound", spec.listen, spec.http, sock)
        conn.record["app_address"], conn.record["app_port"] = _address(addr)
        conn.start(lambda c: _run_outbound(c, spec))

    return accept


class Listener:
    """A listening socket (SO_REUSEPORT) whose connections go to ``accept``.

    Accepting here rather than in ``loop.create_server`` lets each connection's handshake
    use the TLS context current at that moment (``loop.connect_accepted_socket``).
    """

    def __init__(self, sock: socket.socket, accept: Acceptor) -> None:
        self.sock = sock
        self._accept = accept
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._ready)

    @classmethod
    def bind(cls, host: str, port: int, accept: Acceptor, backlog: int) -> Listener:
        """OSError when the address cannot be bound."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return cls(sock, accept)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: pause accepting a moment
                log.error("accept on port %d: %s; pausing accepts", self.port, exc.strerror)
                self._loop.remove_reader(self.sock.fileno())
                self._loop.call_later(ACCEPT_PAUSE_SECONDS, self._resume)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._accept(conn, addr)

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            self._loop.add_reader(self.sock.fileno(), self._ready)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
