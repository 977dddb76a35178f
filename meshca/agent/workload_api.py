"""The SPIFFE Workload API on a Unix socket: the agent's X509-SVID for any SPIFFE client.

Serves ``SpiffeWorkloadAPI`` (the SPIFFE project's workload.proto, kept in
``meshca/api/_proto/workload.proto``) so that go-spiffe, py-spiffe's ``WorkloadApiClient``
and ``X509Source``, java-spiffe or Envoy work against the agent unchanged.

Scope: a sidecar agent (or one agent per VM with one workload) serves its own identity:
everyone who can open the socket gets the same SVID, key and bundle, and the socket's
mode, owner and group are the access control. A node agent (``attestation`` ``k8s`` or
``unix``) tells callers apart by the process on the other end of the connection
(``SO_PEERCRED``, see :mod:`meshca.agent._caller_socket`) and serves each only its own
SVID (:mod:`meshca.agent.identities`); a caller it cannot place is refused with
PERMISSION_DENIED (UNAVAILABLE when the kubelet could not be asked) and the reason
(Workload API 5.2.1: "If the client is not entitled to receive any X509-SVIDs, then the
server SHOULD respond with the PERMISSION_DENIED gRPC status code").

Behaviour, with the rule each follows:

- Every call must carry the metadata ``workload.spiffe.io: true``; a call without it is
  refused with INVALID_ARGUMENT (SPIFFE Workload Endpoint, sections 3 and 6: a guard
  against server-side request forgery).
- ``FetchX509SVID`` streams the SVID (leaf first, then intermediates), its PKCS#8 key and
  the trust bundle; the first message as soon as the agent has credentials (a caller that
  connects earlier waits), then one message on every publication (Workload API 4.3, 5.2.1).
- ``FetchX509Bundles`` streams ``{"spiffe://<trust domain>": DER roots}``; a new message
  only when the bundle changes. Every root is passed, several during a root rotation.
- The JWT-SVID profile is answered with UNIMPLEMENTED: meshca issues X509-SVIDs only
  (Workload API 1 lets an operator disable a profile; clients do not retry UNIMPLEMENTED).
- On :meth:`WorkloadApiServer.stop` open streams end with OK; clients reconnect
  (Workload API 4.2) to the next agent.

The socket is bound inside a private (0700) directory beside its final path, given its
mode and owner there, then renamed into place, so it is never reachable with a wider mode
than configured whatever the umask. A stale socket (nobody listening) is replaced; a live
one, or a file that is not a socket, is refused.

One process only: the generated messages sit at the top of the protobuf namespace (the
contract has no package), and the default descriptor pool refuses a second file that
defines the same names. So this module and another copy of the contract (py-spiffe's
``spiffe._proto``) cannot be imported into one Python process; meshca never imports
``spiffe``, and tests run py-spiffe clients in a subprocess.

Key material is never logged: only the SPIFFE ID, serial number and expiry are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import NoReturn, TypeVar

import grpc
from grpc import aio

from meshca.agent._caller_socket import CallerSocket
from meshca.agent._unix_socket import PrivateUnixSocket, UnixGrpcServer
from meshca.agent.attestation import AttestationError
from meshca.agent.credentials import CredentialStore, X509Credentials
from meshca.agent.identities import CallerStores, FixedStore, StoreProvider, refuse_caller
from meshca.api._proto import workload_pb2, workload_pb2_grpc

log = logging.getLogger(__name__)

HEADER = "workload.spiffe.io"
HEADER_VALUE = "true"
HEADER_MISSING = (
    f"the '{HEADER}: {HEADER_VALUE}' gRPC metadata header is required on every Workload API "
    "call (SPIFFE Workload Endpoint, section 3)"
)
JWT_UNSUPPORTED = (
    "JWT-SVIDs are not available: meshca issues X509-SVIDs only; "
    "use FetchX509SVID or FetchX509Bundles"
)
STOP_GRACE_SECONDS = 2.0
MAX_REQUEST_BYTES = 4 * 1024

_T = TypeVar("_T")


def x509_svid_response(creds: X509Credentials) -> workload_pb2.X509SVIDResponse:
    """The FetchX509SVID message for these credentials (one SVID, no hint, no CRL)."""
    svid = workload_pb2.X509SVID(
        spiffe_id=str(creds.spiffe_id),
        x509_svid=creds.chain_der(),
        x509_svid_key=creds.key_der(),
        bundle=creds.bundle_der(),
    )
    return workload_pb2.X509SVIDResponse(svids=[svid])


def x509_bundles_response(creds: X509Credentials) -> workload_pb2.X509BundlesResponse:
    """The FetchX509Bundles message: the trust domain's roots keyed by its SPIFFE ID."""
    return workload_pb2.X509BundlesResponse(
        bundles={str(creds.trust_domain.id): creds.bundle_der()}
    )


class _WorkloadApiServicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    """The five RPCs; streams follow the caller's store until the server stops."""

    def __init__(self, stores: StoreProvider, stopping: asyncio.Event) -> None:
        self._stores = stores
        self._stopping = stopping
        self.open_streams = 0

    async def FetchX509SVID(  # noqa: N802 (gRPC method name)
        self, request: object, context: aio.ServicerContext[object, object]
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        await _require_header(context)
        self.open_streams += 1
        try:
            async for creds in self._follow(context):
                log.debug(
                    "workload API: sending X509-SVID %s serial %x (v%d, expires %s)",
                    creds.spiffe_id,
                    creds.leaf.serial_number,
                    creds.version,
                    creds.not_after.isoformat(),
                )
                yield x509_svid_response(creds)
        finally:
            self.open_streams -= 1

    async def FetchX509Bundles(  # noqa: N802
        self, request: object, context: aio.ServicerContext[object, object]
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        await _require_header(context)
        self.open_streams += 1
        try:
            sent: tuple[object, ...] | None = None
            async for creds in self._follow(context):
                if creds.bundle == sent:
                    continue
                sent = creds.bundle
                log.debug(
                    "workload API: sending bundle of %s (%d roots)",
                    creds.trust_domain,
                    len(creds.bundle),
                )
                yield x509_bundles_response(creds)
        finally:
            self.open_streams -= 1

    async def FetchJWTSVID(  # noqa: N802
        self, request: object, context: aio.ServicerContext[object, object]
    ) -> workload_pb2.JWTSVIDResponse:
        await _refuse_jwt(context)

    async def FetchJWTBundles(  # noqa: N802
        self, request: object, context: aio.ServicerContext[object, object]
    ) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        await _refuse_jwt(context)
        yield  # unreachable; the yield makes this a streaming handler

    async def ValidateJWTSVID(  # noqa: N802
        self, request: object, context: aio.ServicerContext[object, object]
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        await _refuse_jwt(context)

    async def _follow(
        self, context: aio.ServicerContext[object, object]
    ) -> AsyncIterator[X509Credentials]:
        """The caller's current credentials (once there are any), then each newer
        version; aborts the call when the caller gets no identity here."""
        try:
            async with self._stores.store_for(context) as store:
                seen = 0
                while not self._stopping.is_set():
                    creds = await self._unless_stopping(store.wait_newer(seen))
                    if creds is None:
                        return
                    seen = creds.version
                    yield creds
        except AttestationError as exc:
            await refuse_caller(context, exc, "workload API")

    async def _unless_stopping(self, awaitable: Awaitable[_T]) -> _T | None:
        """``awaitable``'s result, or None if the server starts stopping first."""
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            work.cancel()
            stop.cancel()
        if self._stopping.is_set() or not work.done() or work.cancelled():
            return None
        return work.result()


async def _require_header(context: aio.ServicerContext[object, object]) -> None:
    for key, value in context.invocation_metadata() or ():
        if key == HEADER and value == HEADER_VALUE:
            return
    log.info("workload API: refused a call without the %s header", HEADER)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, HEADER_MISSING)
    raise AssertionError("unreachable: abort raises")


async def _refuse_jwt(context: aio.ServicerContext[object, object]) -> NoReturn:
    await _require_header(context)
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, JWT_UNSUPPORTED)
    raise AssertionError("unreachable: abort raises")


class WorkloadApiServer:
    """A :class:`~meshca.agent.credentials.CredentialSink` serving the SPIFFE Workload API.

    ``socket_path`` is where clients connect (``SPIFFE_ENDPOINT_SOCKET=unix://<path>``);
    its directory must exist. ``socket_mode`` (default 0600) and the optional ``owner`` and
    ``group`` (a name or a numeric id) decide who may connect. Without ``callers`` every
    caller gets the agent's own SVID and key; with them (a node agent), each its own.
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        socket_mode: int = 0o600,
        owner: int | str | None = None,
        group: int | str | None = None,
        callers: CallerStores | None = None,
    ) -> None:
        public = PrivateUnixSocket(
            socket_path,
            mode=socket_mode,
            owner=owner,
            group=group,
            label="workload API socket",
            callers_identified=callers is not None,
        )
        self._callers = callers
        self._grpc = UnixGrpcServer(
            public if callers is None else CallerSocket(public, callers.registry),
            "the SPIFFE Workload API",
            max_request_bytes=MAX_REQUEST_BYTES,
            stop_grace_seconds=STOP_GRACE_SECONDS,
        )
        self._servicer: _WorkloadApiServicer | None = None
        self._stopping = asyncio.Event()

    @property
    def socket_path(self) -> Path:
        return self._grpc.socket.path

    @property
    def open_streams(self) -> int:
        """FetchX509SVID and FetchX509Bundles streams now open (for metrics and tests)."""
        return self._servicer.open_streams if self._servicer else 0

    async def start(self, store: CredentialStore) -> None:
        """Bind the socket, replacing a stale one, and serve ``store``'s credentials."""

        stores: StoreProvider = self._callers if self._callers is not None else FixedStore(store)

        def register(server: aio.Server) -> None:
            self._stopping.clear()
            self._servicer = _WorkloadApiServicer(stores, self._stopping)
            workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(self._servicer, server)

        await self._grpc.start(register)

    async def stop(self) -> None:
        """End every stream, stop serving and remove the socket (if it is still ours)."""
        if not self._grpc.running:
            return
        self._stopping.set()
        await self._grpc.stop()
