"""Envoy SDS v3 on a Unix socket: the agent's SVID, key and trust bundle for Envoy.

Serves ``envoy.service.secret.v3.SecretDiscoveryService`` (protos from ``xds-protos``)
the way Istio's agent does, so an Envoy bootstrap written for Istio works unchanged:

- ``default``: a ``Secret`` with ``tls_certificate``: ``certificate_chain`` the leaf then
  the intermediates (PEM), ``private_key`` the PKCS#8 key (PEM), both ``inline_bytes``.
- ``ROOTCA``: a ``Secret`` with ``validation_context.trusted_ca``: every root of the
  trust domain (PEM), several during a root rotation.

``StreamSecrets`` speaks state-of-the-world xDS (xDS protocol document, "xDS REST and
gRPC protocol", envoyproxy.io), with these choices:

- ``version_info`` is the credentials' version; every response has a fresh random nonce.
- A request without ``response_nonce`` (a stream's first, or a re-subscription) is
  answered with the current version of every secret it names. ``*``, or an empty first
  request, subscribes to both (xDS wildcard rules).
- Unknown names (anything but ``default`` and ``ROOTCA``) are left out of responses and
  logged once per name. For SDS, xDS does not infer deletion from absence (only Listener
  and Cluster responses must hold the whole state), so Envoy keeps waiting for such a
  secret until its ``initial_fetch_timeout`` (15 s by default), then goes on without it,
  while the secrets it can have still arrive and rotate. (Istio's agent reads other names
  as ``file-cert:``/``file-root:`` paths and ends the stream with an error when it
  cannot produce a secret, so Envoy reconnects with backoff; meshca serves no files.)
- ACK: the last response's nonce with its version. NACK: that nonce with
  ``error_detail`` set (or, from clients older than ``error_detail``, the previous
  version). A NACK is logged once with the client's message; the client keeps the last
  version it accepted (this server holds only the current credentials), the same
  version is not sent again, and the next rotation is pushed as usual.
- A request with an older response's nonce is ignored entirely (xDS: "the management
  server should not send a DiscoveryResponse for any DiscoveryRequest that has a stale
  nonce"); the client's request for the newest response follows.
- On every new credentials version, each open stream is sent the secrets it subscribed
  to, once; a version that arrives while a stream is still sending is coalesced into
  the next push. A stream opened before the agent has credentials waits (no polling)
  until they are published, for as long as it stays open.
- ``FetchSecrets`` (unary) answers at once with the current version: UNAVAILABLE before
  the first credentials, NOT_FOUND when none of the names is served.
- ``DeltaSecrets`` (incremental xDS) answers UNIMPLEMENTED; configure Envoy's SDS source
  with ``api_type: GRPC``.
- :meth:`SdsServer.stop` ends every stream with UNAVAILABLE; Envoy reconnects to the
  next agent with backoff and keeps its secrets meanwhile.

Who may connect is decided by the socket's mode, owner and group (see
:mod:`meshca.agent._unix_socket` for how it is created without a window). A node agent
serves each caller the secrets of its own identity (the process on the other end of the
connection, see :mod:`meshca.agent.identities`) and refuses a caller it cannot place with
PERMISSION_DENIED and the reason; Envoy reconnects with backoff. Key material is
never logged: only names, versions, nonces and node IDs are.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc
from envoy.service.secret.v3 import sds_pb2_grpc
from grpc import aio

from meshca.agent._caller_socket import CallerSocket
from meshca.agent._sds_protocol import (
    SERVED_NAMES,
    WILDCARD,
    DiscoveryRequest,
    DiscoveryResponse,
    Kind,
    Outcome,
    SdsProtocolError,
    Snapshot,
    StreamState,
    check_type_url,
    fetch_names,
    new_nonce,
)
from meshca.agent._unix_socket import PrivateUnixSocket, UnixGrpcServer
from meshca.agent.attestation import AttestationError
from meshca.agent.credentials import CredentialStore, X509Credentials
from meshca.agent.identities import CallerStores, FixedStore, StoreProvider, refuse_caller

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 2.0
# A client that has not read a response for this long is disconnected (its stream stalls
# behind gRPC flow control; others are unaffected meanwhile).
WRITE_TIMEOUT_SECONDS = 30.0
MAX_REQUEST_BYTES = 1024 * 1024  # Envoy's node metadata can be tens of kilobytes
MAX_UNKNOWN_NAMES_LOGGED = 64
_SERVED = ", ".join(sorted(SERVED_NAMES))


@dataclass(frozen=True, slots=True)
class SdsStreamStatus:
    """One open StreamSecrets stream, for health output, metrics and tests.

    Versions are ``""`` until there is one.
    """

    node_id: str
    resource_names: tuple[str, ...]
    sent_version: str
    acked_version: str
    nacked_version: str


@dataclass(eq=False, slots=True)
class _Stream:
    context: aio.ServicerContext[object, object]
    store: CredentialStore
    state: StreamState = field(default_factory=StreamState)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def status(self) -> SdsStreamStatus:
        s = self.state
        return SdsStreamStatus(
            node_id=s.node_id,
            resource_names=tuple(sorted(s.names)),
            sent_version=str(s.sent_version) if s.sent_version else "",
            acked_version=s.acked_version,
            nacked_version=s.nacked_version,
        )

    def describe(self) -> str:
        return f"node {self.state.node_id!r}" if self.state.node_id else "a client"


class _SecretDiscoveryServicer:
    """StreamSecrets, FetchSecrets and DeltaSecrets over each caller's store."""

    def __init__(self, stores: StoreProvider, stopping: asyncio.Future[None]) -> None:
        self._stores = stores
        self._stopping = stopping
        self._snapshots: weakref.WeakKeyDictionary[CredentialStore, Snapshot] = (
            weakref.WeakKeyDictionary()
        )
        self._unknown_logged: set[str] = set()
        self.streams: set[_Stream] = set()

    async def StreamSecrets(  # noqa: N802 (gRPC method name)
        self,
        requests: AsyncIterator[DiscoveryRequest],
        context: aio.ServicerContext[object, object],
    ) -> None:
        try:
            async with self._stores.store_for(context) as store:
                await self._stream(_Stream(context, store), requests)
        except AttestationError as exc:
            await refuse_caller(context, exc, "sds")

    async def _stream(self, stream: _Stream, requests: AsyncIterator[DiscoveryRequest]) -> None:
        context = stream.context
        self.streams.add(stream)
        reader = asyncio.create_task(self._serve_requests(stream, requests))
        pusher = asyncio.create_task(self._push_rotations(stream))
        try:
            done, _ = await asyncio.wait(
                {reader, pusher, self._stopping}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            self.streams.discard(stream)
            reader.cancel()
            pusher.cancel()
            await asyncio.gather(reader, pusher, return_exceptions=True)
            log.info("sds: the stream of %s ended", stream.describe())
        for task in (reader, pusher):
            if task in done and not task.cancelled():
                exc = task.exception()
                if isinstance(exc, SdsProtocolError):
                    log.warning("sds: ending the stream of %s: %s", stream.describe(), exc)
                    await _abort(context, exc.code, exc.message)
                if exc is not None and not context.cancelled():
                    raise exc
        if self._stopping.done():
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "the meshca agent is stopping")

    async def FetchSecrets(  # noqa: N802
        self, request: DiscoveryRequest, context: aio.ServicerContext[object, object]
    ) -> DiscoveryResponse:
        try:
            check_type_url(request)
        except SdsProtocolError as exc:
            await _abort(context, exc.code, exc.message)
        names = fetch_names(request)
        self._log_unknown(names, "a FetchSecrets caller")
        try:
            async with self._stores.store_for(context) as store:
                creds = store.current()
        except AttestationError as exc:
            await refuse_caller(context, exc, "sds")
        if creds is None:
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the agent has no credentials yet; retry shortly",
            )
        if not names & SERVED_NAMES:
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"none of the requested secrets is served here; this agent serves {_SERVED}",
            )
        log.debug("sds: FetchSecrets answered with version %d", creds.version)
        return self._snapshot_of(store, creds).response(names, new_nonce())

    async def DeltaSecrets(  # noqa: N802
        self, requests: object, context: aio.ServicerContext[object, object]
    ) -> None:
        await _abort(
            context,
            grpc.StatusCode.UNIMPLEMENTED,
            "incremental (delta) SDS is not served; use StreamSecrets (api_type: GRPC)",
        )

    async def _serve_requests(
        self, stream: _Stream, requests: AsyncIterator[DiscoveryRequest]
    ) -> None:
        """Answer each request; returns when the client closes its side."""
        async for request in requests:
            async with stream.lock:
                creds = stream.store.current()
                outcome = stream.state.on_request(request, creds.version if creds else None)
                self._log_request(stream, request, outcome)
                if outcome.send and creds is not None:
                    await self._send(stream, creds, outcome.send)

    async def _push_rotations(self, stream: _Stream) -> None:
        """Push every new credentials version to this stream (the newest, if several)."""
        seen = 0
        while True:
            seen = (await stream.store.wait_newer(seen)).version
            async with stream.lock:
                creds = stream.store.current()
                assert creds is not None
                send = stream.state.on_rotation(creds.version)
                if send:
                    await self._send(stream, creds, send)

    async def _send(self, stream: _Stream, creds: X509Credentials, names: frozenset[str]) -> None:
        nonce = new_nonce()
        response = self._snapshot_of(stream.store, creds).response(names, nonce)
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                await stream.context.write(response)
        except TimeoutError:
            raise SdsProtocolError(
                grpc.StatusCode.UNAVAILABLE,
                f"the client did not read a response for {WRITE_TIMEOUT_SECONDS:.0f}s",
            ) from None
        stream.state.sent(creds.version, nonce)
        log.debug(
            "sds: sent %s version %d (nonce %s) to %s",
            ",".join(sorted(names)),
            creds.version,
            nonce,
            stream.describe(),
        )

    def _snapshot_of(self, store: CredentialStore, creds: X509Credentials) -> Snapshot:
        """The packed secrets for ``creds``, built once per store and version for all
        the streams it serves."""
        snapshot = self._snapshots.get(store)
        if snapshot is None or snapshot.version != creds.version:
            snapshot = self._snapshots[store] = Snapshot.of(creds)
        return snapshot

    def _log_request(self, stream: _Stream, request: DiscoveryRequest, outcome: Outcome) -> None:
        who = stream.describe()
        if outcome.kind is Kind.STALE:
            log.debug("sds: ignored a request from %s with a stale nonce", who)
            return
        if outcome.kind is Kind.SUBSCRIBE:
            log.info("sds: %s subscribed to %s", who, ",".join(sorted(stream.state.names)))
        elif outcome.kind is Kind.ACK:
            log.debug("sds: %s accepted version %s", who, request.version_info)
        elif outcome.first_nack:
            detail = request.error_detail
            log.warning(
                "sds: %s rejected version %s (nonce %s): code %d: %r; it keeps version %r "
                "and the next rotation is pushed as usual",
                who,
                stream.state.nacked_version,
                request.response_nonce,
                detail.code,
                detail.message[:500],
                request.version_info,
            )
        else:
            log.debug(
                "sds: %s repeated its rejection of version %s", who, stream.state.nacked_version
            )
        self._log_unknown(stream.state.names, who)

    def _log_unknown(self, names: frozenset[str], who: str) -> None:
        for name in sorted(names - SERVED_NAMES - {WILDCARD}):
            if name in self._unknown_logged:
                continue
            if len(self._unknown_logged) >= MAX_UNKNOWN_NAMES_LOGGED:
                return
            self._unknown_logged.add(name)
            log.warning(
                "sds: %s asked for secret %r, which this agent does not serve (it serves "
                "%s); it is left out of responses, and Envoy waits for it until its "
                "initial_fetch_timeout",
                who,
                name[:200],
                _SERVED,
            )


async def _abort(
    context: aio.ServicerContext[object, object], code: grpc.StatusCode, message: str
) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


class SdsServer:
    """A :class:`~meshca.agent.credentials.CredentialSink` serving Envoy SDS v3.

    ``socket_path`` is where Envoy connects (its SDS cluster's ``pipe.path``); its
    directory must exist. ``socket_mode`` (default 0600) and the optional ``owner`` and
    ``group`` (a name or a numeric id) decide who may fetch the agent's key. A stale
    socket at the path is replaced; one another process is serving on is refused.
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        socket_mode: int = 0o600,
        owner: str | int | None = None,
        group: str | int | None = None,
        callers: CallerStores | None = None,
    ) -> None:
        public = PrivateUnixSocket(
            socket_path,
            mode=socket_mode,
            owner=owner,
            group=group,
            label="SDS socket",
            callers_identified=callers is not None,
        )
        self._callers = callers
        self._grpc = UnixGrpcServer(
            public if callers is None else CallerSocket(public, callers.registry),
            "Envoy SDS",
            max_request_bytes=MAX_REQUEST_BYTES,
            stop_grace_seconds=STOP_GRACE_SECONDS,
        )
        self._servicer: _SecretDiscoveryServicer | None = None
        self._stopping: asyncio.Future[None] | None = None

    @property
    def socket_path(self) -> Path:
        return self._grpc.socket.path

    def streams(self) -> tuple[SdsStreamStatus, ...]:
        """The StreamSecrets streams open now."""
        if self._servicer is None:
            return ()
        return tuple(stream.status() for stream in self._servicer.streams)

    async def start(self, store: CredentialStore) -> None:
        """Bind the socket (see :mod:`meshca.agent._unix_socket`) and serve ``store``."""

        stores: StoreProvider = self._callers if self._callers is not None else FixedStore(store)

        def register(server: aio.Server) -> None:
            self._stopping = asyncio.get_running_loop().create_future()
            self._servicer = _SecretDiscoveryServicer(stores, self._stopping)
            sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(self._servicer, server)

        await self._grpc.start(register)

    async def stop(self) -> None:
        """End every stream (UNAVAILABLE), stop serving, remove the socket if still ours."""
        if not self._grpc.running:
            return
        if self._stopping is not None and not self._stopping.done():
            self._stopping.set_result(None)
        await self._grpc.stop()
