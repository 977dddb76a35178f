"""The agent's client for the CA: ``istio.v1.auth.IstioCertificateService/CreateCertificate``.

Two ways in, both over TLS verified against the agent's trust anchors (with the server
name the operator chose; plaintext only for development):

- the token port (``ca_address``): the credential source's bearer token as
  ``authorization: Bearer <token>``, read anew for each call;
- the mTLS port (``mtls_address``): the SVID the agent holds as the client certificate,
  and no token. A fresh channel per call, since each renewal changes the certificate.

Every call has a deadline. Failures become :class:`CAError` with a ``retryable`` flag:
UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED and INTERNAL may clear up (with the
server's ``google.rpc.RetryInfo`` hint when it sends one); anything else, such as
PERMISSION_DENIED, INVALID_ARGUMENT or UNAUTHENTICATED, will not without a change
somewhere, and the caller should back off long.

Every answer is checked before it is used, and refused rather than guessed at: each entry
is one certificate; the leaf carries our public key, exactly one URI SAN, the expected
SPIFFE ID (or, on a first token issuance where the CA decides the path, one in our trust
domain) and is not a CA; the last entry is the root, and the chain verifies to it and it
to our anchors (RFC 5280 path validation by cryptography).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.verification import VerificationError
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from meshca.agent.credential_sources import CredentialSource
from meshca.agent.credentials import X509Credentials
from meshca.agent.trust import TrustAnchors, verify_chain
from meshca.api._proto import istioca_pb2, istioca_pb2_grpc
from meshca.errors import MeshcaError, SpiffeIdError
from meshca.pki.keys import PublicKey
from meshca.spiffe import SpiffeId

log = logging.getLogger(__name__)

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
    }
)
_RECONNECT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
MAX_RESPONSE_BYTES = 1024 * 1024
STATUS_DETAILS_KEY = "grpc-status-details-bin"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
"""The request metadata field naming the workload a node agent asks for (Istio's)."""


class CAError(MeshcaError):
    """A certificate request failed, or its answer was refused.

    ``code`` is the gRPC status (None when the answer itself was refused);
    ``retryable`` says whether trying again soon may help; ``retry_after`` is the
    server's hint in seconds (google.rpc.RetryInfo), when it sent one.
    """

    default_reason = "ca_error"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        retryable: bool,
        code: grpc.StatusCode | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.retryable = retryable
        self.code = code
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Issued:
    """A checked answer: the SVID chain (leaf first, no root) and the root it ends at."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    root: x509.Certificate
    via: str
    """``token`` or ``svid``: how the agent authenticated."""

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


class CAClient:
    """Calls CreateCertificate on the CA; one per agent, used by one task at a time (a
    change of anchors replaces the channel under any other caller)."""

    def __init__(
        self,
        *,
        address: str,
        anchors: TrustAnchors,
        credential: CredentialSource,
        server_name: str | None,
        timeout: timedelta,
        mtls_address: str | None = None,
        cluster_id: str | None = None,
    ) -> None:
        if server_name is None and mtls_address is not None:
            raise ValueError("the mTLS port needs TLS: a server name is required")
        self.address = address
        self.mtls_address = mtls_address
        self.anchors = anchors
        self.credential = credential
        self._server_name = server_name
        self._timeout = timeout.total_seconds()
        self._cluster_id = cluster_id
        self._channel: aio.Channel | None = None
        self._channel_anchors = -1

    @property
    def plaintext(self) -> bool:
        return self._server_name is None

    def describe(self) -> str:
        if self.plaintext:
            return f"{self.address} (plaintext)"
        mtls = f", SVID renewal on {self.mtls_address}" if self.mtls_address else ""
        return f"{self.address} (TLS, server name {self._server_name}{mtls})"

    async def create_certificate(
        self,
        csr_pem: str,
        public_key: PublicKey,
        *,
        ttl: timedelta,
        expected: SpiffeId | None,
        svid: X509Credentials | None = None,
        impersonate: SpiffeId | None = None,
    ) -> Issued:
        """Request a certificate for ``csr_pem`` and check the answer.

        With ``svid`` the call goes to the mTLS port, authenticated by that SVID;
        otherwise to the token port with the credential source's token. ``expected``
        is the SPIFFE ID the leaf must carry; None accepts any ID with a path in the
        anchors' trust domain (a first issuance, where the CA decides the path).
        ``impersonate`` asks for that workload's identity instead of the agent's own
        (a node agent; Istio's ``ImpersonatedIdentity`` request metadata).
        Raises CAError, CredentialError or TrustError.
        """
        await self.anchors.ensure()
        request = istioca_pb2.IstioCertificateRequest(
            csr=csr_pem, validity_duration=max(1, int(ttl.total_seconds()))
        )
        if impersonate is not None:
            request.metadata.update({IMPERSONATED_IDENTITY: str(impersonate)})
        metadata: list[tuple[str, str]] = []
        if self._cluster_id:
            metadata.append(("clusterid", self._cluster_id))
        if svid is not None:
            target, via = self._mtls_target(), "svid"
            async with self._mtls_channel(svid, target) as channel:
                pems = await self._call(channel, target, request, metadata)
        else:
            token = await self.credential.token()
            if token is not None:
                metadata.append(("authorization", f"Bearer {token}"))
            target, via = self.address, "token"
            channel = await self._token_channel()
            pems = await self._call(channel, target, request, metadata)
        return check_answer(
            pems, public_key, anchors=self.anchors, expected=expected, via=via, target=target
        )

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def _call(
        self,
        channel: aio.Channel,
        target: str,
        request: istioca_pb2.IstioCertificateRequest,
        metadata: list[tuple[str, str]],
    ) -> list[str]:
        stub = istioca_pb2_grpc.IstioCertificateServiceStub(channel)
        try:
            response = await stub.CreateCertificate(
                request, metadata=metadata, timeout=self._timeout
            )
        except aio.AioRpcError as err:
            if err.code() in _RECONNECT and channel is self._channel:
                # A fresh channel connects at once when the CA is back, instead of
                # waiting out gRPC's own reconnect backoff (up to two minutes).
                await self.close()
            raise ca_error(err, target) from None
        return list(response.cert_chain)

    def _options(self) -> list[tuple[str, str | int]]:
        options: list[tuple[str, str | int]] = [
            ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
            ("grpc.enable_retries", 0),
        ]
        if self._server_name is not None:
            options.append(("grpc.ssl_target_name_override", self._server_name))
        return options

    async def _token_channel(self) -> aio.Channel:
        if self._channel is not None and self._channel_anchors == self.anchors.version:
            return self._channel
        # First use, or the anchors changed (a root rotation): connect anew, verifying
        # against the anchors in force now.
        await self.close()
        if self.plaintext:
            channel = aio.insecure_channel(self.address, options=self._options())
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.anchors.pem())
            channel = aio.secure_channel(self.address, credentials, options=self._options())
        self._channel, self._channel_anchors = channel, self.anchors.version
        return channel

    def _mtls_target(self) -> str:
        if self.mtls_address is None:
            raise CAError(
                "renewal with the SVID needs the CA's mTLS port: set mtls_address",
                reason="no_mtls_address",
                retryable=False,
            )
        return self.mtls_address

    def _mtls_channel(self, svid: X509Credentials, target: str) -> aio.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.anchors.pem(),
            private_key=svid.key_pem(),
            certificate_chain=svid.chain_pem(),
        )
        return aio.secure_channel(target, credentials, options=self._options())


def retry_after(metadata: Sequence[tuple[str, str | bytes]] | None) -> float | None:
    """The delay of a ``google.rpc.RetryInfo`` in ``grpc-status-details-bin``, seconds."""
    for key, value in metadata or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None  # a malformed detail is no hint
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                seconds = float(info.retry_delay.ToTimedelta().total_seconds())
                return seconds if seconds >= 0 else None
    return None


def ca_error(err: aio.AioRpcError, target: str) -> CAError:
    """A gRPC failure as a CAError: retryable or not, with the server's retry hint."""
    code = err.code()
    details = (err.details() or "").strip() or "no details"
    hint = retry_after(tuple(err.trailing_metadata() or ()))
    retryable = code in RETRYABLE
    if code == grpc.StatusCode.UNAVAILABLE:
        message = f"the CA at {target} is unavailable: {details}"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        message = f"the CA at {target} is overloaded: {details}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the CA at {target} did not answer in time: {details}"
    else:
        message = f"the CA at {target} refused the request ({code.name}): {details}"
    return CAError(
        message, reason=code.name.lower(), retryable=retryable, code=code, retry_after=hint
    )


def _refuse(target: str, what: str, reason: str) -> CAError:
    return CAError(
        f"refused the answer of the CA at {target}: {what}", reason=reason, retryable=False
    )


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_answer(
    pems: Sequence[str],
    public_key: PublicKey,
    *,
    anchors: TrustAnchors,
    expected: SpiffeId | None,
    via: str,
    target: str,
) -> Issued:
    """Parse and check a CreateCertificate answer (see the module docstring)."""
    if len(pems) < 2:
        raise _refuse(
            target,
            f"it holds {len(pems)} certificate(s); expected the leaf, any intermediates "
            "and the root, leaf first",
            "response_malformed",
        )
    certs: list[x509.Certificate] = []
    for index, text in enumerate(pems):
        try:
            parsed = x509.load_pem_x509_certificates(text.encode())
        except ValueError as exc:
            raise _refuse(
                target, f"cert_chain[{index}] is not a PEM certificate: {exc}", "response_malformed"
            ) from None
        if len(parsed) != 1:
            raise _refuse(
                target,
                f"cert_chain[{index}] holds {len(parsed)} certificates; expected one",
                "response_malformed",
            )
        certs.append(parsed[0])
    leaf, root = certs[0], certs[-1]
    if _spki(leaf.public_key()) != _spki(public_key):
        raise _refuse(
            target, "the leaf certificate is not for the agent's key", "response_wrong_key"
        )
    spiffe_id = _leaf_identity(leaf, target)
    if expected is not None and spiffe_id != expected:
        raise _refuse(
            target, f"the leaf is for {spiffe_id}, not {expected}", "response_wrong_identity"
        )
    if not spiffe_id.member_of(anchors.trust_domain) or spiffe_id.is_trust_domain_id:
        raise _refuse(
            target,
            f"the leaf is for {spiffe_id}, not a workload in trust domain {anchors.trust_domain}",
            "response_wrong_identity",
        )
    if root.subject != root.issuer:
        raise _refuse(
            target,
            "the last certificate of the chain is not a (self-issued) root",
            "response_malformed",
        )
    # Plaintext (development): nothing to verify against but the root the CA names.
    trusted = anchors.current if anchors.verifies else (root,)
    try:
        path = verify_chain(leaf, certs[1:], trusted)
    except VerificationError as exc:
        raise _refuse(
            target,
            f"the chain for {spiffe_id} does not verify to the trust bundle "
            f"({anchors.description}): {exc}",
            "response_untrusted",
        ) from None
    if path[-1] != root:
        raise _refuse(
            target,
            "the chain verifies to another root than the one the CA named last",
            "response_untrusted",
        )
    if not anchors.verifies:
        anchors.learn(root)
    return Issued(spiffe_id=spiffe_id, chain=tuple(certs[:-1]), root=root, via=via)


def _leaf_identity(leaf: x509.Certificate, target: str) -> SpiffeId:
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if constraints.ca:
            raise _refuse(target, "the leaf certificate is a CA certificate", "response_malformed")
    except x509.ExtensionNotFound:
        pass
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise _refuse(
            target,
            f"an X509-SVID has exactly one URI SAN (X509-SVID 2); the leaf has {len(uris)}",
            "response_malformed",
        )
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise _refuse(
            target, f"the leaf's URI SAN is not a SPIFFE ID: {exc}", "response_malformed"
        ) from None
