"""TLS contexts built from the agent's credentials, and the X509-SVID checks on a peer.

A new pair of contexts (server and client) is built on every publication of the
credentials; listeners look the current pair up at each accept or connect, so new
handshakes use the new certificate and bundle at once while established connections
keep the context they were made with.

OpenSSL verifies the peer's chain against the trust bundle (the roots) with the
intermediates the peer sends; the hostname check is off and replaced by the SPIFFE
checks of :func:`check_peer` (X509-SVID spec, sections 3 and 4).

Resumption: session tickets are off (TLS 1.3 and 1.2). OpenSSL's server-side session
cache, which Python offers no way to turn off, still lets a TLS 1.2 client resume a
session by its ID; such a handshake verifies no certificate. It cannot outlive the
bundle (each publication builds new contexts, with empty caches), the X509-SVID checks
and the policy run on every connection, resumed or not, and :func:`check_peer` checks
the certificate's validity period itself at every connection, so a resumed session
never stretches a certificate past its notAfter.

The private key reaches OpenSSL through an anonymous memory file (``memfd_create``),
never through a file on disk.
"""

from __future__ import annotations

import contextlib
import functools
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509

from meshca.agent.credentials import X509Credentials
from meshca.errors import SpiffeIdError
from meshca.spiffe import SpiffeId, TrustDomain

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# TLS 1.2 only with forward secrecy and AEAD; TLS 1.3 suites are OpenSSL's defaults.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What the access log and the policy need from a verified peer certificate."""

    spiffe_id: SpiffeId
    serial: str
    not_before: datetime
    not_after: datetime


class PeerRefusedError(Exception):
    """The peer's certificate chains to the bundle but is not an acceptable X509-SVID."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_peer(
    der: bytes | None, trust_domain: TrustDomain, now: datetime | None = None
) -> PeerIdentity:
    """The peer's identity from its verified leaf; PeerRefusedError saying what is wrong.

    X509-SVID 2 and 3: exactly one URI SAN, a valid SPIFFE ID with a path, in our trust
    domain; 4.1: a leaf is not a CA (BasicConstraints CA:true is refused); 4.3: its
    KeyUsage has digitalSignature and neither keyCertSign nor cRLSign. RFC 5280
    4.1.2.5: ``now`` (default: the current time) lies within the validity period.

    A peer presents the same certificate on every connection until it rotates, so the
    answer of the checks that do not depend on time is cached by the certificate's bytes
    (refusals too). The validity period is checked on every call: OpenSSL checks it in a
    full handshake, but a resumed TLS 1.2 session verifies no certificate.
    """
    if not der:
        raise PeerRefusedError("the peer sent no certificate")
    outcome = _check_cached(der, trust_domain)
    if isinstance(outcome, str):
        raise PeerRefusedError(outcome)
    now = now or datetime.now(UTC)
    if now > outcome.not_after:
        raise PeerRefusedError(f"the peer certificate expired at {outcome.not_after.isoformat()}")
    if now < outcome.not_before:
        raise PeerRefusedError(
            f"the peer certificate is not valid before {outcome.not_before.isoformat()}"
        )
    return outcome


@functools.lru_cache(maxsize=4096)
def _check_cached(der: bytes, trust_domain: TrustDomain) -> PeerIdentity | str:
    try:
        return _check(der, trust_domain)
    except PeerRefusedError as exc:
        return exc.reason


def _check(der: bytes, trust_domain: TrustDomain) -> PeerIdentity:
    cert = x509.load_der_x509_certificate(der)
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is not None and basic.ca:
        raise PeerRefusedError(
            "the peer certificate is a CA certificate (CA:true); an X509-SVID is not"
        )
    try:
        usage: x509.KeyUsage | None = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or not usage.digital_signature:
        raise PeerRefusedError(
            "the peer certificate's KeyUsage lacks digitalSignature; an X509-SVID has it"
        )
    if usage.key_cert_sign or usage.crl_sign:
        raise PeerRefusedError(
            "the peer certificate may sign certificates or CRLs (KeyUsage keyCertSign or "
            "cRLSign); an X509-SVID may not"
        )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PeerRefusedError(
            "the peer certificate has no URI SAN; an X509-SVID has one"
        ) from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise PeerRefusedError(
            f"the peer certificate has {len(uris)} URI SANs; an X509-SVID has exactly one"
        )
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise PeerRefusedError(f"the peer's URI SAN is not a SPIFFE ID: {exc}") from None
    if spiffe_id.is_trust_domain_id:
        raise PeerRefusedError(f"the peer's SPIFFE ID {spiffe_id} has no path")
    if not spiffe_id.member_of(trust_domain):
        raise PeerRefusedError(
            f"the peer's SPIFFE ID {spiffe_id} is in trust domain {spiffe_id.trust_domain}; "
            f"allowed: {trust_domain}"
        )
    return PeerIdentity(
        spiffe_id,
        format(cert.serial_number, "x"),
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read ``data`` from, backed by memory only (Linux memfd)."""
    fd = os.memfd_create("meshca-proxy-svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _context(
    creds: X509Credentials, purpose: ssl.Purpose, min_version: ssl.TLSVersion
) -> ssl.SSLContext:
    server = purpose is ssl.Purpose.CLIENT_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = min_version
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if min_version < ssl.TLSVersion.TLSv1_3:
        ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if server:
        ctx.num_tickets = 0
    ctx.load_verify_locations(cadata=creds.bundle_pem().decode())
    with _memory_file(creds.chain_pem() + creds.key_pem()) as path:
        ctx.load_cert_chain(path)
    return ctx


@dataclass(frozen=True, slots=True)
class TlsContexts:
    """The contexts for one version of the credentials."""

    creds: X509Credentials
    server: ssl.SSLContext
    client: ssl.SSLContext

    @classmethod
    def build(cls, creds: X509Credentials, min_version: str = "1.3") -> TlsContexts:
        version = TLS_VERSIONS[min_version]
        return cls(
            creds,
            _context(creds, ssl.Purpose.CLIENT_AUTH, version),
            _context(creds, ssl.Purpose.SERVER_AUTH, version),
        )


def handshake_failure(exc: BaseException) -> str:
    """A one-line reason for a failed handshake, as OpenSSL names it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).lower().replace("_", " ")
        return f"TLS handshake failed: {reason}"
    # asyncio and uvloop abort a slow handshake with ConnectionAbortedError("... is taking
    # longer than N seconds ...").
    if isinstance(exc, TimeoutError) or "taking longer than" in str(exc):
        return "TLS handshake timed out"
    if isinstance(exc, ConnectionError | OSError):
        detail = exc.strerror or str(exc) or "the peer closed the connection"
        return f"connection lost during the TLS handshake: {detail}"
    return f"TLS handshake failed: {exc}"
