"""Renewal with the X509-SVID a workload already holds (mTLS client certificate).

A caller that completed a TLS handshake with a client certificate chaining to this CA's
current trust bundle gets a certificate for the same SPIFFE ID without a token, as with
Istio's client-certificate authenticator and SPIRE's agent renewal. The TLS layer has
already verified the chain; this module verifies it again against the bundle at the
current time (defence in depth, and clear refusal messages), then reads the identity
from the single URI SAN (SPIFFE X509-SVID spec, section 2).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.x509 import verification

from meshca.authn.base import Attestation, Authenticator, AuthMethod, Credential, Peer
from meshca.authn.gce import is_google_token
from meshca.authn.join_token import is_join_token
from meshca.errors import AuthenticationError, SpiffeIdError
from meshca.spiffe import SpiffeId, TrustDomain


def _now() -> datetime:
    return datetime.now(UTC)


IssuedBefore = Callable[[x509.Certificate], Awaitable[bool]]


class SvidAuthenticator:
    """Accepts an unexpired X509-SVID of this trust domain that this CA issued.

    Chaining to the bundle is not enough: the certificate must also be one the ledger
    records (``issued_before``), so a certificate minted with a leaked intermediate key,
    or by a CA sharing the root, cannot be renewed into fresh ledgered certificates.
    """

    def __init__(
        self,
        trust_domain: TrustDomain,
        bundle: Callable[[], Sequence[x509.Certificate]],
        issued_before: IssuedBefore,
        *,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self._trust_domain = trust_domain
        self._bundle = bundle
        self._issued_before = issued_before
        self._clock = clock

    async def authenticate(self, credential: Credential, peer: Peer) -> Attestation:
        if not peer.certificates:
            raise AuthenticationError(
                "no client certificate was presented", reason="no_client_certificate"
            )
        leaf, *intermediates = peer.certificates
        now = self._clock()
        if leaf.not_valid_after_utc <= now:
            raise AuthenticationError(
                f"the client certificate expired at {leaf.not_valid_after_utc.isoformat()}",
                reason="svid_expired",
            )
        spiffe_id = self._spiffe_id(leaf)
        store = verification.Store(list(self._bundle()))
        verifier = verification.PolicyBuilder().store(store).time(now).build_client_verifier()
        try:
            verifier.verify(leaf, intermediates)
        except verification.VerificationError as exc:
            raise AuthenticationError(
                f"the client certificate for {spiffe_id} does not chain to this CA's current "
                f"trust bundle: {exc}",
                reason="svid_untrusted",
            ) from None
        if not await self._issued_before(leaf):
            raise AuthenticationError(
                f"the client certificate for {spiffe_id} (serial {leaf.serial_number:x}) is "
                "not one this CA issued: no ledger record",
                reason="svid_unknown",
            )
        return Attestation(
            spiffe_id=spiffe_id,
            method=AuthMethod.X509_SVID,
            selectors=(f"x509:serial:{leaf.serial_number:x}",),
            expires_at=leaf.not_valid_after_utc,
        )

    def _spiffe_id(self, leaf: x509.Certificate) -> SpiffeId:
        try:
            sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            sans = x509.SubjectAlternativeName([])
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise AuthenticationError(
                f"an X509-SVID has exactly one URI SAN; the client certificate has {len(uris)}",
                reason="svid_malformed",
            )
        try:
            spiffe_id = SpiffeId.parse(uris[0])
        except SpiffeIdError as exc:
            raise AuthenticationError(
                f"the client certificate's URI SAN is not a SPIFFE ID: {exc}",
                reason="svid_malformed",
            ) from None
        if not spiffe_id.member_of(self._trust_domain):
            raise AuthenticationError(
                f"{spiffe_id} belongs to another trust domain; this CA renews only "
                f"{self._trust_domain} identities",
                reason="svid_foreign_trust_domain",
            )
        return spiffe_id


class CallerAuthenticator:
    """Picks the authenticator for what the caller presented.

    A verified client certificate (the mTLS port) renews by SVID. A bearer token with
    the join-token prefix goes to the join-token authenticator. A bearer token whose
    issuer, read without verification, is Google goes to the GCE authenticator (or is
    refused when GCE authentication is off); every other token goes to the Kubernetes
    authenticator. The peek only routes: each path verifies the token against its own
    issuer and keys, so a token cannot cross from one to the other.
    """

    def __init__(
        self,
        token: Authenticator,
        svid: SvidAuthenticator,
        gce: Authenticator | None = None,
        join: Authenticator | None = None,
    ) -> None:
        self._token = token
        self._svid = svid
        self._gce = gce
        self._join = join

    async def authenticate(self, credential: Credential, peer: Peer) -> Attestation:
        if peer.certificates:
            return await self._svid.authenticate(credential, peer)
        if is_join_token(credential.bearer_token):
            if self._join is None:
                raise AuthenticationError(
                    "this CA does not accept join tokens", reason="join_token_not_accepted"
                )
            return await self._join.authenticate(credential, peer)
        if is_google_token(credential.bearer_token):
            if self._gce is None:
                raise AuthenticationError(
                    "this CA does not accept GCE instance identity tokens: it was started "
                    "without --gce-project",
                    reason="gce_not_configured",
                )
            return await self._gce.authenticate(credential, peer)
        return await self._token.authenticate(credential, peer)

    async def close(self) -> None:
        for authenticator in (self._token, self._gce):
            closer = getattr(authenticator, "close", None)
            if closer is not None:
                await closer()
