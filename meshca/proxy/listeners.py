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
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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
REFUSAL_LINGER_SECONDS = 0.25  # a refused peer's bytes are read and dropped this long


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


class _Refused(Exception):  # noqa: N818 (control flow, not an error)
    def __init__(self, decision: str, rule: str | None, reason: str) -> None:
        super().__init__(reason)
        self.decision, self.rule, self.reason = decision, rule, reason


def _address(transport: asyncio.BaseTransport) -> tuple[str | None, int | None]:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return None, None


class _Nobody:
    def leg_lost(self, leg: Leg, exc: Exception | None) -> None:
        pass


_NO_LEG = Leg(_Nobody())


class Connection:
    """One proxied connection: its legs, its handshake, its access-log line."""

    def __init__(self, state: ProxyState, direction: str, listener: str, http: bool) -> None:
        self.state = state
        self.direction = direction
        self.listener = listener
        self.http = http
        self.start_time = datetime.now(UTC)
        self.started = time.monotonic()
        self.downstream: Leg = _NO_LEG
        self.upstream: Leg | None = None
        self.record: dict[str, Any] = {}
        self.decision = "error"
        self.rule: str | None = None
        self.reason: str | None = None
        self.exchange: HttpExchange | None = None
        self._working = True
        self._logged = False
        self._idle: asyncio.TimerHandle | None = None

    # life cycle -------------------------------------------------------------------
    def accepted(self, run: Callable[[], Any]) -> None:
        """Called from ``connection_made``: hold the bytes and start the connection's task."""
        transport = self.downstream.transport
        assert transport is not None
        transport.pause_reading()
        self.state.active += 1
        self.state.connections.add(self)
        limits = self.state.limits
        if self.state.active > limits.max_connections:
            self._working = False
            self._refuse_now(f"max connections reached ({limits.max_connections})")
            return
        task = asyncio.get_running_loop().create_task(run())
        task.add_done_callback(self._task_done)

    def _refuse_now(self, reason: str) -> None:
        self.decision, self.reason = "error", reason
        self.downstream.abort()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._working = False
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("proxy connection failed unexpectedly", exc_info=exc)
            self.decision, self.reason = "error", f"internal error: {type(exc).__name__}: {exc}"
            self.downstream.abort()
            if self.upstream is not None:
                self.upstream.abort()
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
        self.downstream.close()
        if self.upstream is not None:
            self.upstream.close()

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

    async def handshake(
        self, leg: Leg, ctx: ssl.SSLContext, *, server_side: bool
    ) -> tuple[ssl.SSLObject, PeerIdentity]:
        """TLS on ``leg``'s transport, then the X509-SVID checks; _Refused otherwise."""
        loop = asyncio.get_running_loop()
        plain = leg.transport
        assert plain is not None
        try:
            tls = await loop.start_tls(
                plain,
                leg,
                ctx,
                server_side=server_side,
                ssl_handshake_timeout=self.state.limits.handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self.state.metrics.handshake_failures.labels(self.direction).inc()
            leg.closed = True
            plain.abort()
            raise _Refused("deny", "mtls handshake", handshake_failure(exc)) from None
        if tls is None:
            leg.closed = True
            raise _Refused("error", "mtls handshake", "the connection closed during the handshake")
        assert isinstance(tls, asyncio.Transport)
        leg.attach(tls)
        tls.pause_reading()
        ssl_object = tls.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
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
        return ssl_object, peer

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
        self.downstream.shut(REFUSAL_LINGER_SECONDS)
        if self.upstream is not None:
            self.upstream.close()

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
        self.state.access_log.write(line)

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


class _Accepted(Leg):
    """The downstream leg of a new connection; starts the connection's task."""

    __slots__ = ("run",)

    def __init__(self, conn: Connection, run: Callable[[Connection], Any]) -> None:
        super().__init__(conn)
        self.run = run

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        conn = self.owner
        assert isinstance(conn, Connection)
        conn.accepted(lambda: self.run(conn))


async def _run_inbound(conn: Connection, spec: Inbound) -> None:
    client = conn.downstream
    assert client.transport is not None
    conn.record["peer_address"], conn.record["peer_port"] = _address(client.transport)
    try:
        ctxs = conn.contexts()
        _, peer = await conn.handshake(client, ctxs.server, server_side=True)
        decision = conn.state.policy.decide(spec.listen, peer.spiffe_id)
        conn.rule = decision.rule
        if not decision.allowed:
            raise _Refused("deny", decision.rule, f"{peer.spiffe_id} refused by the policy")
        server = await conn.connect_upstream(*spec.app)
        if client.closed:
            server.close()
            raise _Refused("error", conn.rule, "the peer closed before the application answered")
        conn.relay(client, server)
    except _Refused as exc:
        conn.refused(exc)


async def _run_outbound(conn: Connection, spec: Outbound) -> None:
    app = conn.downstream
    assert app.transport is not None
    conn.record["app_address"], conn.record["app_port"] = _address(app.transport)
    try:
        ctxs = conn.contexts()
        server = await conn.connect_upstream(*spec.remote)
        assert server.transport is not None
        conn.record["peer_address"], conn.record["peer_port"] = _address(server.transport)
        _, peer = await conn.handshake(server, ctxs.client, server_side=False)
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
        if app.closed:
            raise _Refused("error", conn.rule, "the application closed before the handshake ended")
        conn.relay(app, server)
    except _Refused as exc:
        conn.refused(exc)


def inbound_factory(state: ProxyState, spec: Inbound) -> Callable[[], asyncio.Protocol]:
    def make() -> asyncio.Protocol:
        conn = Connection(state, "inbound", spec.listen, spec.http)
        conn.downstream = _Accepted(conn, lambda c: _run_inbound(c, spec))
        return conn.downstream

    return make


def outbound_factory(state: ProxyState, spec: Outbound) -> Callable[[], asyncio.Protocol]:
    def make() -> asyncio.Protocol:
        conn = Connection(state, "outbound", spec.listen, spec.http)
        conn.downstream = _Accepted(conn, lambda c: _run_outbound(c, spec))
        return conn.downstream

    return make
