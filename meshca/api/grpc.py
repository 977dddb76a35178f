"""gRPC front door: Istio's IstioCertificateService and Google's MeshCertificateService,
translated to the CA's domain calls.

This module is the only place where meshca errors become gRPC status codes:

    AuthenticationError                 -> UNAUTHENTICATED
    a body protobuf cannot decode,
    an invalid Duration, a bad request_id -> INVALID_ARGUMENT (checked before authentication)
    PolicyError (request_id reused)     -> ALREADY_EXISTS
    PolicyError (pod_lookup_unavailable) -> UNAVAILABLE (node authorization could not ask
                                           the Kubernetes API; the caller may retry)
    PolicyError (anything else)         -> PERMISSION_DENIED
    CSRError (identity mismatch)        -> PERMISSION_DENIED
    CSRError (anything else)            -> INVALID_ARGUMENT
    SignerError, StoreError             -> UNAVAILABLE (the caller may retry)
    AuthenticationError (*_unavailable) -> UNAVAILABLE (the issuer or API server is down)
    anything unexpected                 -> INTERNAL (logged with its traceback)

Callers see a message naming their own mistake; for failures inside the CA (database,
signer, an unreachable token issuer) they see only what happened and that they may retry,
while the details (URLs, driver errors) go to the CA's log.
    OverloadError                       -> RESOURCE_EXHAUSTED, with a google.rpc.RetryInfo
    the caller's deadline passed        -> DEADLINE_EXCEEDED (the work is abandoned; if
                                           gRPC cancelled the handler first, it is only
                                           counted and logged)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import NoReturn

import grpc
from cryptography import x509
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from meshca.api._proto import istioca_pb2, istioca_pb2_grpc, meshca_pb2, meshca_pb2_grpc
from meshca.api.admission import Admission, AdmissionLimits
from meshca.api.wire import (
    InvalidDurationError,
    Undecodable,
    duration_to_timedelta,
    tolerant_deserializer,
)
from meshca.authn.base import Attestation, Authenticator, Credential, Peer
from meshca.ca.authority import Authority, IssueRequest
from meshca.ca.node_authz import ISTIO_METADATA_KEY, MESHCA_HEADER, NodeAuthorizer
from meshca.errors import (
    AuthenticationError,
    CSRError,
    MeshcaError,
    OverloadError,
    PolicyError,
    SignerError,
    StoreError,
)
from meshca.metrics import CAMetrics

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024
MAX_METADATA_BYTES = 32 * 1024
IDLE_CONNECTION = timedelta(minutes=5)
CONNECTION_AGE_GRACE = timedelta(minutes=1)
MAX_REQUEST_SECONDS = 30.0
"""No request is worked on longer than this, whatever deadline the caller sent (or none)."""
MAX_VALIDITY_SECONDS = 10 * 365 * 86400
"""Requested lifetimes are capped here before any arithmetic (then by the policy)."""


def server_options(
    *,
    handshake_timeout: timedelta,
    reuse_port: bool,
    max_connection_age: timedelta = timedelta(minutes=30),
) -> list[tuple[str, int]]:
    """gRPC server channel arguments: size limits, time limits, port sharing.

    A client that connects and sends nothing is dropped after ``handshake_timeout``; a
    connection with no RPC for IDLE_CONNECTION is closed. A connection older than
    ``max_connection_age`` gets a GOAWAY (its RPCs in flight have CONNECTION_AGE_GRACE
    to finish) and the client reconnects, possibly to another worker or replica: without
    it, the spread of long-lived connections that SO_REUSEPORT or a Kubernetes Service
    made at connect time never changes. ``reuse_port`` lets worker processes share a
    port (SO_REUSEPORT); off, a port already taken is an error.
    """
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.server_handshake_timeout_ms", _ms(handshake_timeout)),
        ("grpc.max_connection_idle_ms", _ms(IDLE_CONNECTION)),
        ("grpc.max_connection_age_ms", _ms(max_connection_age)),
        ("grpc.max_connection_age_grace_ms", _ms(CONNECTION_AGE_GRACE)),
        ("grpc.so_reuseport", int(reuse_port)),
    ]


def _ms(value: timedelta) -> int:
    return max(1, int(value.total_seconds() * 1000))


_PERMISSION_REASONS = frozenset({"csr_identity_mismatch"})


def status_for(error: MeshcaError) -> grpc.StatusCode:
    """The gRPC status code for a meshca error (see module docstring)."""
    if isinstance(error, AuthenticationError):
        if error.reason.endswith("_unavailable"):  # our dependency is down, not the caller
            return grpc.StatusCode.UNAVAILABLE
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(error, PolicyError):
        if error.reason == "request_id_reused":
            return grpc.StatusCode.ALREADY_EXISTS
        if error.reason.endswith("_unavailable"):  # the Kubernetes API, not the caller
            return grpc.StatusCode.UNAVAILABLE
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(error, CSRError):
        if error.reason in _PERMISSION_REASONS:
            return grpc.StatusCode.PERMISSION_DENIED
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, SignerError | StoreError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def peer_address(context: aio.ServicerContext[object, object]) -> str:
    """``ipv4:1.2.3.4:5`` / ``ipv6:[::1]:5`` as gRPC reports it, without the family prefix."""
    raw: str = context.peer() or "unknown"
    for prefix in ("ipv4:", "ipv6:"):
        if raw.startswith(prefix):
            return raw[len(prefix) :]
    return raw


def _call_over(context: aio.ServicerContext[object, object]) -> bool:
    """Whether gRPC has ended the call already (its deadline passed, or the caller left)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return True
    try:
        return bool(context.done())
    except NotImplementedError:  # an implementation without the (experimental) method
        return False


def caller_message(error: MeshcaError) -> str:
    """What the caller is told: their own mistakes in full, the CA's troubles in general."""
    if isinstance(error, StoreError):
        return "the CA's database is unavailable; retry later"
    if isinstance(error, SignerError):
        return "the CA cannot sign right now (its key backend is unavailable); retry later"
    if isinstance(error, AuthenticationError) and error.reason.endswith("_unavailable"):
        return (
            "the CA cannot verify tokens right now (the token issuer is unreachable); retry later"
        )
    if isinstance(error, PolicyError) and error.reason.endswith("_unavailable"):
        return (
            "the CA cannot check the node's pods right now (the Kubernetes API is "
            "unreachable); retry later"
        )
    return error.message


def peer_certificates(context: aio.ServicerContext[object, object]) -> tuple[x509.Certificate, ...]:
    """The client certificate chain the TLS layer verified (mTLS port), leaf first."""
    auth = context.auth_context() or {}
    leaf_pem = b"".join(auth.get("x509_pem_cert") or [])
    if not leaf_pem:
        return ()
    chain_pem = b"".join(auth.get("x509_pem_cert_chain") or [])
    try:
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        chain = x509.load_pem_x509_certificates(chain_pem) if chain_pem else []
        # The chain property's order is not the wire order; put the leaf first.
        return (leaf, *(c for c in chain if c != leaf))
    except ValueError as exc:
        raise AuthenticationError(
            f"the client certificate could not be parsed: {exc}", reason="svid_malformed"
        ) from None


_SINGLE_HEADERS = {
    "authorization": "send exactly one ('authorization: Bearer <token>')",
    "clusterid": "send at most one",
}


def credential_from_metadata(metadata: Sequence[tuple[str, str | bytes]]) -> Credential:
    """Read ``authorization: Bearer <token>`` and the optional ``clusterid`` header.

    A repeated ``authorization`` or ``clusterid`` header is refused: which one a proxy
    or a server honours differs, so a second one is either a mistake or an attempt to
    smuggle a credential (or a cluster choice) past something that checked the first.
    """
    for header, advice in _SINGLE_HEADERS.items():
        count = sum(1 for key, _ in metadata if key.lower() == header)
        if count > 1:
            raise AuthenticationError(
                f"the request has {count} {header} headers; {advice}",
                reason=f"duplicate_{header}",
            )
    token: str | None = None
    cluster: str | None = None
    for key, value in metadata:
        if isinstance(value, bytes):
            continue
        lowered = key.lower()
        if lowered == "authorization":
            scheme, _, rest = value.partition(" ")
            if scheme.lower() != "bearer" or not rest.strip():
                raise AuthenticationError(
                    "the authorization header must be 'Bearer <token>'",
                    reason="malformed_authorization",
                )
            token = rest.strip()
        elif lowered == "clusterid":
            cluster = value.strip() or None
    return Credential(bearer_token=token, cluster_id=cluster)


def impersonation_headers(metadata: Sequence[tuple[str, str | bytes]]) -> list[str]:
    """The values of the ``meshca-impersonated-identity`` header (the MeshCA API's way of
    naming the identity a node agent asks for)."""
    return [
        value.strip()
        for key, value in metadata
        if key.lower() == MESHCA_HEADER and isinstance(value, str)
    ]


class CertificateFrontend:
    """What both gRPC services share: admission, authentication, node authorization,
    issuance, metrics, and the mapping of every refusal to a status code."""

    def __init__(
        self,
        authority: Authority,
        authenticator: Authenticator,
        metrics: CAMetrics,
        admission: Admission | None = None,
        *,
        node_authorizer: NodeAuthorizer | None = None,
    ) -> None:
        self.authority = authority
        self.authenticator = authenticator
        self.metrics = metrics
        self.admission = admission or Admission(AdmissionLimits())
        self.node_authorizer = node_authorizer

    async def create(
        self,
        api: str,
        request: IssueRequest,
        context: aio.ServicerContext[object, object],
        *,
        impersonate: str | None = None,
    ) -> tuple[str, ...]:
        """Issue for the calling peer (or, with ``impersonate``, for the workload a node
        agent names), or abort the RPC with the mapped status code."""
        started = time.perf_counter()
        peer = Peer(address=peer_address(context))
        callers_deadline = False
        try:
            with self.admission.slot():
                self.admission.check_peer(peer.address)
                remaining = context.time_remaining()
                callers_deadline = remaining is not None and remaining < MAX_REQUEST_SECONDS
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                limit = remaining if callers_deadline else MAX_REQUEST_SECONDS
                async with asyncio.timeout(limit):
                    peer = Peer(address=peer.address, certificates=peer_certificates(context))
                    attestation = await self._authenticate(peer, context, request.csr)
                    self.admission.check_identity(str(attestation.spiffe_id))
                    if impersonate is not None:
                        attestation = await self._delegate(attestation, impersonate)
                    issued = await self.authority.issue(request, attestation, peer)
        except TimeoutError:
            await self._refuse(
                api,
                peer,
                started,
                context,
                "deadline_exceeded",
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the caller's deadline passed before the certificate was issued",
                callers_deadline=callers_deadline,
            )
        except asyncio.CancelledError:
            # gRPC cancels the handler itself when the caller's deadline passes (it may
            # beat the timeout above) or the caller goes away. The work is abandoned
            # either way; count and log it like any other refusal, then let it unwind.
            remaining = context.time_remaining()
            reason = (
                "deadline_exceeded" if remaining is not None and remaining <= 0 else "cancelled"
            )
            self.metrics.refused.labels(api, reason).inc()
            self.metrics.latency.labels(api, "refused").observe(time.perf_counter() - started)
            log.info("abandoned %s request from %s: %s", api, peer.address, reason)
            raise
        except OverloadError as exc:
            retry = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=exc.message)
            info = error_details_pb2.RetryInfo()
            info.retry_delay.FromTimedelta(timedelta(seconds=exc.retry_after))
            retry.details.add().Pack(info)
            await self._refuse(
                api,
                peer,
                started,
                context,
                exc.reason,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                exc.message,
                rpc_status.to_status(retry).trailing_metadata,
            )
        except MeshcaError as exc:
            await self._refuse(
                api,
                peer,
                started,
                context,
                exc.reason,
                status_for(exc),
                caller_message(exc),
                detail=exc.message,
            )
        except Exception:  # the request boundary: answer, count and log any bug
            log.exception("%s request from %s failed unexpectedly", api, peer.address)
            await self._refuse(
                api,
                peer,
                started,
                context,
                "internal_error",
                grpc.StatusCode.INTERNAL,
                "the CA failed unexpectedly; the error is in its log",
            )
        self.metrics.issued.labels(api, str(attestation.method)).inc()
        self.metrics.latency.labels(api, "issued").observe(time.perf_counter() - started)
        # The audit line of this certificate was written with its ledger row
        # (meshca.ca.ledger, one line per commit).
        return issued.chain_pem

    async def refuse_request(
        self,
        api: str,
        context: aio.ServicerContext[object, object],
        reason: str,
        message: str,
    ) -> NoReturn:
        """Refuse a request whose fields are invalid (INVALID_ARGUMENT), before any work."""
        peer = Peer(address=peer_address(context))
        code = grpc.StatusCode.INVALID_ARGUMENT
        await self._refuse(api, peer, time.perf_counter(), context, reason, code, message)

    async def _delegate(self, agent: Attestation, requested: str) -> Attestation:
        if self.node_authorizer is None:
            raise PolicyError(
                f"{agent.spiffe_id} asked to impersonate {requested[:120]!r}, but this CA "
                "lets no agent obtain identities other than its own (node_agents is not "
                "configured); each workload must present its own credential",
                reason="impersonation_not_enabled",
            )
        return await self.node_authorizer.authorize(agent, requested)

    async def _authenticate(
        self, peer: Peer, context: aio.ServicerContext[object, object], csr: bytes | str
    ) -> Attestation:
        try:
            credential = credential_from_metadata(tuple(context.invocation_metadata() or ()))
            credential = dataclasses.replace(credential, csr=csr)
            return await self.authenticator.authenticate(credential, peer)
        except AuthenticationError as exc:
            self.metrics.auth_failures.labels(exc.reason).inc()
            raise

    async def _refuse(
        self,
        api: str,
        peer: Peer,
        started: float,
        context: aio.ServicerContext[object, object],
        reason: str,
        code: grpc.StatusCode,
        message: str,
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
        *,
        detail: str | None = None,
        callers_deadline: bool = False,
    ) -> NoReturn:
        """Count and log the refusal, then end the call with ``code`` and ``message``.

        A call whose deadline has passed (``callers_deadline``: the timeout that fired was
        the caller's own) is ended by gRPC itself, which tells the caller
        DEADLINE_EXCEEDED; sending a status on it as well races gRPC's, and the loser makes
        grpcio log an ExecuteBatchError with a traceback. Such a call unwinds as cancelled.
        """
        self.metrics.refused.labels(api, reason).inc()
        self.metrics.latency.labels(api, "refused").observe(time.perf_counter() - started)
        log.info(
            "refused %s request from %s: %s (%s)", api, peer.address, detail or message, reason
        )
        if callers_deadline or _call_over(context):
            raise asyncio.CancelledError
        await context.abort(code, message, trailing_metadata=tuple(trailing_metadata))
        raise AssertionError("unreachable: abort raises")


class IstioCertificateService(istioca_pb2_grpc.IstioCertificateServiceServicer):  # type: ignore[misc]
    """``istio.v1.auth.IstioCertificateService``: wire-compatible with istio-agent."""

    API = "istio"

    def __init__(self, frontend: CertificateFrontend) -> None:
        self._frontend = frontend

    async def CreateCertificate(  # noqa: N802 - name fixed by the wire contract
        self,
        request: istioca_pb2.IstioCertificateRequest | Undecodable,
        context: aio.ServicerContext[object, object],
    ) -> istioca_pb2.IstioCertificateResponse:
        if isinstance(request, Undecodable):
            await self._frontend.refuse_request(
                self.API, context, "undecodable_request", request.message
            )
        impersonate = await self._impersonation(request, context)
        # Zero or negative means "the default", as in Istio's CA (security/pkg/pki/ca).
        seconds = min(request.validity_duration, MAX_VALIDITY_SECONDS)
        ttl = timedelta(seconds=seconds) if seconds > 0 else None
        chain = await self._frontend.create(
            self.API,
            IssueRequest(csr=request.csr, requested_ttl=ttl),
            context,
            impersonate=impersonate,
        )
        return istioca_pb2.IstioCertificateResponse(cert_chain=list(chain))

    async def _impersonation(
        self,
        request: istioca_pb2.IstioCertificateRequest,
        context: aio.ServicerContext[object, object],
    ) -> str | None:
        """The identity a node agent asks for: ``metadata.ImpersonatedIdentity`` (a string,
        as Istio's ztunnel sends it), or None."""
        if impersonation_headers(tuple(context.invocation_metadata() or ())):
            await self._frontend.refuse_request(
                self.API,
                context,
                "impersonation_header_on_istio_api",
                f"the Istio API names the identity asked for in the request metadata's "
                f"{ISTIO_METADATA_KEY} field, not in the {MESHCA_HEADER} header",
            )
        if not request.HasField("metadata") or ISTIO_METADATA_KEY not in request.metadata.fields:
            return None
        value = request.metadata.fields[ISTIO_METADATA_KEY]
        if value.WhichOneof("kind") != "string_value" or not value.string_value.strip():
            await self._frontend.refuse_request(
                self.API,
                context,
                "invalid_impersonated_identity",
                f"metadata.{ISTIO_METADATA_KEY} must be a SPIFFE ID as a string",
            )
        text: str = value.string_value.strip()
        return text


class MeshCertificateService(meshca_pb2_grpc.MeshCertificateServiceServicer):  # type: ignore[misc]
    """``google.security.meshca.v1.MeshCertificateService``: idempotent by request_id."""

    API = "meshca"

    def __init__(self, frontend: CertificateFrontend) -> None:
        self._frontend = frontend

    async def CreateCertificate(  # noqa: N802 - name fixed by the wire contract
        self,
        request: meshca_pb2.MeshCertificateRequest | Undecodable,
        context: aio.ServicerContext[object, object],
    ) -> meshca_pb2.MeshCertificateResponse:
        frontend = self._frontend
        if isinstance(request, Undecodable):
            await frontend.refuse_request(self.API, context, "undecodable_request", request.message)
        request_id = self._request_id(request.request_id)
        if request_id is None:
            await frontend.refuse_request(
                self.API,
                context,
                "invalid_request_id",
                f"request_id {request.request_id[:64]!r} must be a UUID other than the zero UUID",
            )
        ttl: timedelta | None = None
        if request.HasField("validity"):
            try:
                ttl = duration_to_timedelta(request.validity, "validity")
            except InvalidDurationError as exc:
                await frontend.refuse_request(self.API, context, "invalid_validity", str(exc))
            if ttl < timedelta(0):
                await frontend.refuse_request(
                    self.API,
                    context,
                    "invalid_validity",
                    f"validity is negative ({ttl.total_seconds():g}s); send a positive "
                    "duration, or no validity for the CA's default",
                )
            ttl = min(ttl, timedelta(seconds=MAX_VALIDITY_SECONDS))
        headers = impersonation_headers(tuple(context.invocation_metadata() or ()))
        if len(headers) > 1 or (headers and not headers[0]):
            await frontend.refuse_request(
                self.API,
                context,
                "invalid_impersonated_identity",
                f"send at most one {MESHCA_HEADER} header, holding one SPIFFE ID",
            )
        chain = await self._frontend.create(
            self.API,
            IssueRequest(csr=request.csr, requested_ttl=ttl, request_id=request_id),
            context,
            impersonate=headers[0] if headers else None,
        )
        return meshca_pb2.MeshCertificateResponse(cert_chain=list(chain))

    @staticmethod
    def _request_id(text: str) -> str | None:
        """The canonical form of a non-zero UUID, or None."""
        try:
            value = uuid.UUID(text)
        except ValueError:
            return None
        return None if value.int == 0 else str(value)


def add_services(server: aio.Server, frontend: CertificateFrontend) -> None:
    """Register both services, with request bodies decoded by the handlers' rules.

    The generated ``add_*_to_server`` functions decode with ``FromString``, whose errors
    grpcio turns into UNKNOWN before the handler runs; the same registration with
    :func:`~meshca.api.wire.tolerant_deserializer` lets the handler say what was wrong.
    """
    istio = IstioCertificateService(frontend)
    mesh = MeshCertificateService(frontend)
    services = {
        "istio.v1.auth.IstioCertificateService": grpc.unary_unary_rpc_method_handler(
            istio.CreateCertificate,
            request_deserializer=tolerant_deserializer(
                istioca_pb2.IstioCertificateRequest, "istio.v1.auth.IstioCertificateRequest"
            ),
            response_serializer=istioca_pb2.IstioCertificateResponse.SerializeToString,
        ),
        "google.security.meshca.v1.MeshCertificateService": grpc.unary_unary_rpc_method_handler(
            mesh.CreateCertificate,
            request_deserializer=tolerant_deserializer(
                meshca_pb2.MeshCertificateRequest,
                "google.security.meshca.v1.MeshCertificateRequest",
            ),
            response_serializer=meshca_pb2.MeshCertificateResponse.SerializeToString,
        ),
    }
    for name, handler in services.items():
        methods = {"CreateCertificate": handler}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, methods),))
        server.add_registered_method_handlers(name, methods)
