"""The agent's trust anchors, where they come from, and how a CA answer is checked.

The anchors do two jobs: they verify the CA's TLS certificate when the agent connects,
and every certificate chain the CA returns must verify to one of them. They are also the
trust bundle the agent hands to its data plane, whole (several roots while a root
rotation is under way).

Sources (one per agent, see :mod:`meshca.agent.config`):

- :class:`BundleFile`: a PEM file, re-read on each refresh (a ConfigMap the operator
  updates before activating a new root).
- :class:`PinnedBundleUrl`: the CA's ``GET /v1/bundle`` (PEM). The document is accepted
  only if it holds a root whose SHA-256 fingerprint is pinned, and then as a whole; its
  other roots are pinned from then on (for this process), so a root rotation carries the
  pin from the old root to the new one. The
  pin proves the document comes from the operator's CA; fetch it over https, or over a
  network path you trust, because the pin cannot vouch for the *other* roots of a
  document an on-path attacker could have extended.
- none (plaintext, development): the anchors are learned from the first chain the CA
  returns; nothing is really verified.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from meshca.errors import MeshcaError
from meshca.pki.profile import fingerprint
from meshca.spiffe import TrustDomain

log = logging.getLogger(__name__)

MAX_BUNDLE_BYTES = 1024 * 1024


class TrustError(MeshcaError):
    """The trust anchors could not be had, or a bundle was refused.

    ``retryable``: a fetch that failed (network, HTTP status) may work later; a bundle
    that does not hold a pinned root, or is not a bundle, will not.
    """

    default_reason = "bundle_unavailable"

    def __init__(self, message: str, *, reason: str | None = None, retryable: bool) -> None:
        super().__init__(message, reason=reason)
        self.retryable = retryable


def parse_bundle(
    data: bytes, where: str, trust_domain: TrustDomain
) -> tuple[x509.Certificate, ...]:
    """The CA certificates in a PEM bundle; TrustError unless each is a CA of the domain."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TrustError(
            f"{where} is not a PEM bundle of certificates: {exc}",
            reason="bundle_malformed",
            retryable=False,
        ) from None
    for cert in certs:
        problem = _not_an_anchor(cert, trust_domain)
        if problem:
            raise TrustError(f"{where}: {problem}", reason="bundle_malformed", retryable=False)
    return tuple(certs)


def _not_an_anchor(cert: x509.Certificate, trust_domain: TrustDomain) -> str | None:
    name = cert.subject.rfc4514_string() or fingerprint(cert)[:16]
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        return f"certificate {name} is not a CA certificate; a trust bundle holds CAs only"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    foreign = [u for u in uris if u.startswith("spiffe://") and u != str(trust_domain.id)]
    if foreign:
        return f"CA certificate {name} belongs to {foreign[0]}, not {trust_domain.id}"
    return None


class BundleSource(Protocol):
    """Where anchors come from; ``load`` raises TrustError."""

    @property
    def description(self) -> str: ...

    async def load(self) -> tuple[x509.Certificate, ...]: ...


class BundleFile:
    """A PEM file of roots, re-read on each load."""

    def __init__(self, path: Path, trust_domain: TrustDomain) -> None:
        self.path = path
        self._trust_domain = trust_domain

    @property
    def description(self) -> str:
        return f"trust bundle {self.path}"

    async def load(self) -> tuple[x509.Certificate, ...]:
        try:
            data = await asyncio.to_thread(self.path.read_bytes)
        except OSError as exc:
            raise TrustError(
                f"cannot read the CA trust bundle {self.path}: {exc.strerror or exc}",
                reason="bundle_unreadable",
                retryable=True,
            ) from None
        certs = parse_bundle(data, f"the CA trust bundle {self.path}", self._trust_domain)
        if not certs:
            raise TrustError(
                f"the CA trust bundle {self.path} holds no certificate",
                reason="bundle_empty",
                retryable=True,
            )
        return certs


class PinnedBundleUrl:
    """The CA's bundle endpoint, accepted when it holds a root with a pinned fingerprint."""

    def __init__(
        self, url: str, pins: Sequence[str], trust_domain: TrustDomain, timeout: timedelta
    ) -> None:
        self.url = url
        self.pins = frozenset(pins)
        self._trust_domain = trust_domain
        self._timeout = timeout.total_seconds()

    @property
    def description(self) -> str:
        return f"bundle {self.url} (pinned)"

    async def load(self) -> tuple[x509.Certificate, ...]:
        import aiohttp  # only agents that fetch their bundle need an HTTP client

        try:
            async with (
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self._timeout)
                ) as session,
                session.get(self.url, allow_redirects=False) as resp,
            ):
                if resp.status != 200:
                    raise TrustError(
                        f"the CA bundle endpoint {self.url} answered HTTP {resp.status}",
                        reason="bundle_http_status",
                        retryable=True,
                    )
                data = await resp.content.read(MAX_BUNDLE_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TrustError(
                f"cannot fetch the CA bundle from {self.url}: {exc or type(exc).__name__}",
                reason="bundle_unreachable",
                retryable=True,
            ) from None
        if len(data) > MAX_BUNDLE_BYTES:
            raise TrustError(
                f"the CA bundle from {self.url} is larger than {MAX_BUNDLE_BYTES} bytes",
                reason="bundle_malformed",
                retryable=False,
            )
        certs = parse_bundle(data, f"the CA bundle from {self.url}", self._trust_domain)
        if not any(fingerprint(c) in self.pins for c in certs):
            found = ", ".join(fingerprint(c)[:16] for c in certs) or "none"
            raise TrustError(
                f"the CA bundle from {self.url} holds no root with a pinned SHA-256 "
                f"fingerprint (roots found: {found}); refusing it",
                reason="bundle_pin_mismatch",
                retryable=False,
            )
        # A root published beside a pinned one is vouched for by it: the pin follows a
        # root rotation, so the document stays acceptable once the old root is retired.
        self.pins = self.pins | {fingerprint(c) for c in certs}
        return certs


class TrustAnchors:
    """The anchors in force; ``version`` grows when they change."""

    def __init__(self, source: BundleSource | None, trust_domain: TrustDomain) -> None:
        self.source = source
        self.trust_domain = trust_domain
        self.current: tuple[x509.Certificate, ...] = ()
        self.version = 0

    @property
    def description(self) -> str:
        return self.source.description if self.source else "none (plaintext: unverified)"

    @property
    def verifies(self) -> bool:
        """False in plaintext mode: the anchors are whatever the CA said."""
        return self.source is not None

    async def ensure(self) -> None:
        """Load the anchors once if there are none yet."""
        if self.source is not None and not self.current:
            await self.refresh()

    async def refresh(self) -> bool:
        """Load from the source; True when the anchors changed. Raises TrustError."""
        if self.source is None:
            return False
        certs = await self.source.load()
        return self._set(certs)

    def learn(self, root: x509.Certificate) -> bool:
        """Plaintext mode only: adopt the root the CA's answer names."""
        if self.source is not None or root in self.current:
            return False
        log.warning(
            "plaintext mode: trusting root %s from the CA's answer without verification",
            fingerprint(root)[:16],
        )
        return self._set((*self.current, root))

    def _set(self, certs: tuple[x509.Certificate, ...]) -> bool:
        if certs == self.current:
            return False
        before = {fingerprint(c)[:16] for c in self.current}
        after = {fingerprint(c)[:16] for c in certs}
        self.current = certs
        self.version += 1
        log.info(
            "trust bundle from %s: %d root(s) %s%s",
            self.description,
            len(certs),
            ", ".join(sorted(after)),
            f" (was {', '.join(sorted(before))})" if before else "",
        )
        return True

    def pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.current)


def verify_chain(
    leaf: x509.Certificate,
    rest: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    now: datetime | None = None,
) -> list[x509.Certificate]:
    """RFC 5280 path validation (cryptography's client verifier) of ``leaf`` through
    ``rest`` to one of ``anchors``; returns the path, anchor last. Raises
    VerificationError."""
    store = verification.Store(list(anchors))
    when = now or datetime.now(UTC)  # explicit, so freezegun's clock applies
    verifier = verification.PolicyBuilder().store(store).time(when).build_client_verifier()
    return list(verifier.verify(leaf, list(rest)).chain)
