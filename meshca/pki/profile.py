"""The certificate profile: what meshca's roots, intermediates and X509-SVIDs contain.

Rules come from RFC 5280 and the SPIFFE X509-SVID specification (cited per section
below):

- Every certificate: a critical KeyUsage (RFC 5280 4.2.1.3, X509-SVID 4.3); a Subject Key
  Identifier (4.2.1.2) and an Authority Key Identifier (4.2.1.1) taken from the issuer's
  SKI; a random positive serial (4.1.2.2) with far more than 64 bits of entropy; a
  notBefore backdated by :data:`CLOCK_SKEW` (4.1.2.5) so that peers whose clocks run a
  little slow accept a certificate issued a moment ago.
- CA certificates: BasicConstraints CA:true, critical (4.2.1.9, X509-SVID 4.1);
  keyCertSign and cRLSign only (X509-SVID 3.2, 4.3); the URI SAN ``spiffe://<td>`` with no
  path (X509-SVID 3.2); optional URI name constraints on intermediates (4.2.1.10,
  X509-SVID 4.2).
- X509-SVIDs: exactly one URI SAN, the SPIFFE ID, with a non-empty path (X509-SVID 2, 3.1);
  an empty subject, so the SAN is critical (4.1.2.6); digitalSignature, plus
  keyEncipherment for RSA keys only; serverAuth + clientAuth (X509-SVID 4.4);
  BasicConstraints CA:false, critical.

Every builder takes the issuer as a :class:`~meshca.signers.base.Signer` (wrapped with
``as_private_key``) or an in-memory private key; cryptography does all the encoding, and
the signature digest follows the issuer key (SHA-384 for P-384, else SHA-256). Builders
raise ValueError for arguments that break the profile; those are programming errors, not
caller errors, so they are not MeshcaErrors.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshca.pki.keys import KeyAlgorithm, PrivateKey, PublicKey
from meshca.pki.svid_der import SvidTemplate
from meshca.signers.base import Signer, as_private_key
from meshca.spiffe import SpiffeId, TrustDomain

CLOCK_SKEW = timedelta(minutes=5)
"""How far notBefore is backdated (never before the issuer's own notBefore)."""

SERIAL_BITS = 159
"""Random bits in a serial: the most that keeps it positive in RFC 5280's 20 octets."""

ROOT_CN = "meshca root CA"
INTERMEDIATE_CN = "meshca issuing CA"


def new_serial() -> int:
    """A random, positive, non-zero serial number of up to 159 bits.

    RFC 5280 4.1.2.2: positive and at most 20 octets, so at most 159 value bits once
    DER adds its sign bit. The CA/Browser Forum baseline (7.1) asks for at least 64 bits
    from a CSPRNG; ``secrets`` gives 159.
    """
    while True:
        serial = secrets.randbits(SERIAL_BITS)
        if serial:
            return serial


def fingerprint(cert: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the certificate's DER encoding."""
    return cert.fingerprint(hashes.SHA256()).hex()


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The certificate's URI SANs, in order; empty when it has no SAN extension."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def describe(cert: x509.Certificate) -> dict[str, str]:
    """A flat, printable summary for logs and ``meshca admin`` output."""
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "uri_sans": " ".join(uri_sans(cert)),
        "ca": "true" if is_ca else "false",
        "sha256": fingerprint(cert),
    }


def build_root(
    signer: Signer | PrivateKey,
    trust_domain: TrustDomain,
    *,
    ttl: timedelta,
    now: datetime,
) -> x509.Certificate:
    """A self-signed root for ``trust_domain``, signed by ``signer``.

    BasicConstraints CA:true without a path length; keyCertSign + cRLSign; URI SAN
    ``spiffe://<td>``; subject ``O=<td>, CN=meshca root CA <serial prefix>``. The AKI
    repeats the root's own SKI: RFC 5280 4.2.1.1 lets a self-signed certificate omit it,
    but meshca gives every certificate both. notBefore is ``now - CLOCK_SKEW``,
    notAfter ``now + ttl``.
    """
    key, algorithm = _signing_key(signer)
    if ttl <= timedelta(0):
        raise ValueError(f"root ttl must be positive, got {ttl}")
    now = _utc(now)
    serial = new_serial()
    subject = _ca_subject(trust_domain, ROOT_CN, serial)
    public_key = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        _base(subject, subject, public_key, serial, now - CLOCK_SKEW, now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(_uri_san(trust_domain.id), critical=False)
    )
    return builder.sign(key, algorithm.hash_algorithm())


def build_cross_certificate(
    old_root_signer: Signer | PrivateKey,
    old_root: x509.Certificate,
    new_root: x509.Certificate,
    *,
    now: datetime,
) -> x509.Certificate:
    """The new root's subject and key, certified by the old root (a cross-certificate).

    A peer that trusts only ``old_root`` builds leaf -> intermediate -> this certificate
    -> old root. Same extensions as a root (CA:true, keyCertSign + cRLSign, URI SAN); SKI
    of the new key, AKI of the old root; it ends when the first of the two roots ends.
    """
    key, algorithm = _signing_key(old_root_signer)
    _check_issuer(key, old_root, child_path_length=None)
    public_key = new_root.public_key()
    assert isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey))
    not_after = min(new_root.not_valid_after_utc, old_root.not_valid_after_utc)
    san = new_root.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    builder = (
        _base(
            new_root.subject,
            old_root.subject,
            public_key,
            new_serial(),
            _utc(now) - CLOCK_SKEW,
            not_after,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(old_root), critical=False)
        .add_extension(san.value, critical=san.critical)
    )
    return builder.sign(key, algorithm.hash_algorithm())


def build_intermediate(
    issuer: Signer | PrivateKey,
    issuer_cert: x509.Certificate,
    public_key: PublicKey,
    trust_domain: TrustDomain,
    *,
    ttl: timedelta,
    now: datetime,
    path_length: int = 0,
    name_constraints: bool = False,
) -> x509.Certificate:
    """An issuing CA certificate for ``public_key``, signed by ``issuer``.

    BasicConstraints CA:true with ``path_length`` (0: it signs leaves only);
    keyCertSign + cRLSign; URI SAN ``spiffe://<td>``; subject
    ``O=<td>, CN=meshca issuing CA <serial prefix>``. Validity runs from
    ``now - CLOCK_SKEW`` (not before the issuer's notBefore) to ``now + ttl`` (not past the
    issuer's notAfter).

    With ``name_constraints``, a critical NameConstraints extension permits only URIs
    whose host is the trust domain: RFC 5280 4.2.1.10 says a URI constraint is a host
    name, not a URI, so the permitted subtree is the bare name ``<td>``. A leaked
    intermediate then cannot mint identities in another trust domain for verifiers that
    enforce URI constraints (OpenSSL does; cryptography's verifier rejects the chain as
    unsupported), which is why it is off by default (X509-SVID 4.2).
    """
    key, algorithm = _signing_key(issuer)
    _check_issuer(key, issuer_cert, child_path_length=path_length)
    KeyAlgorithm.of(public_key)  # raises UnsupportedKeyError (a ValueError)
    if ttl <= timedelta(0):
        raise ValueError(f"intermediate ttl must be positive, got {ttl}")
    if path_length < 0:
        raise ValueError(f"path_length must be >= 0, got {path_length}")
    now = _utc(now)
    not_before, not_after = _window(issuer_cert, now, now + ttl)
    serial = new_serial()
    builder = (
        _base(
            _ca_subject(trust_domain, INTERMEDIATE_CN, serial),
            issuer_cert.subject,
            public_key,
            serial,
            not_before,
            not_after,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(issuer_cert), critical=False)
        .add_extension(_uri_san(trust_domain.id), critical=False)
    )
    if name_constraints:
        permitted: list[x509.GeneralName] = [x509.UniformResourceIdentifier(trust_domain.name)]
        builder = builder.add_extension(
            x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None),
            critical=True,  # RFC 5280 4.2.1.10: conforming CAs MUST mark it critical
        )
    return builder.sign(key, algorithm.hash_algorithm())


@dataclass(frozen=True, slots=True)
class PreparedIssuer:
    """An issuing key and certificate checked once, with what every leaf copies from them.

    Building a leaf then skips re-checking the issuer (key matches certificate, CA:true,
    its trust domain) and re-deriving its AKI: work that is the same for every
    certificate an intermediate signs.
    """

    key: PrivateKey
    algorithm: KeyAlgorithm
    certificate: x509.Certificate
    subject: x509.Name
    authority_key_id: x509.AuthorityKeyIdentifier
    spiffe_ids: tuple[str, ...]
    template: SvidTemplate | None = None
    """The DER template of this issuer's X509-SVIDs (:mod:`meshca.pki.svid_der`); None
    when it did not reproduce cryptography's encoding (the builder is used then)."""

    @classmethod
    def prepare(
        cls, issuer: Signer | PrivateKey, issuer_cert: x509.Certificate, *, template: bool = True
    ) -> PreparedIssuer:
        key, algorithm = _signing_key(issuer)
        _check_issuer(key, issuer_cert, child_path_length=None)
        prepared = cls(
            key=key,
            algorithm=algorithm,
            certificate=issuer_cert,
            subject=issuer_cert.subject,
            authority_key_id=_aki(issuer_cert),
            spiffe_ids=tuple(u for u in uri_sans(issuer_cert) if u.startswith("spiffe://")),
        )
        if not template or not prepared.spiffe_ids:
            return prepared
        return dataclasses.replace(prepared, template=_svid_template(prepared))


def build_svid(
    issuer: Signer | PrivateKey | PreparedIssuer,
    issuer_cert: x509.Certificate,
    public_key: PublicKey,
    spiffe_id: SpiffeId,
    *,
    not_after: datetime,
    now: datetime,
    dns_names: Sequence[str] = (),
) -> x509.Certificate:
    """An X509-SVID for ``spiffe_id`` and ``public_key``, signed by ``issuer``.

    Exactly one URI SAN, ``spiffe_id``, whose path must not be empty (X509-SVID 3.1) and
    whose trust domain must be the issuer's. The subject is empty and the SAN critical
    (RFC 5280 4.1.2.6, 4.2.1.6). KeyUsage digitalSignature, plus keyEncipherment for an
    RSA key (X509-SVID 4.3); EKU serverAuth + clientAuth (X509-SVID 4.4);
    BasicConstraints CA:false. notAfter is ``min(not_after, issuer notAfter)``.

    ``dns_names`` is for the CA's own serving certificate only (policy decides who gets
    them): each becomes a DNS SAN, or an IP SAN if it is an IP literal, and the first,
    when it fits in 64 characters, becomes the subject CN, so the SAN is then
    non-critical.
    """
    if not isinstance(issuer, PreparedIssuer):
        issuer = PreparedIssuer.prepare(issuer, issuer_cert, template=False)
    elif issuer.certificate != issuer_cert:
        raise ValueError("the prepared issuer belongs to another certificate")
    KeyAlgorithm.of(public_key)  # raises UnsupportedKeyError (a ValueError)
    if spiffe_id.is_trust_domain_id:
        raise ValueError(f"an X509-SVID needs a SPIFFE ID with a path, got {spiffe_id}")
    issuer_ids = issuer.spiffe_ids
    if issuer_ids and str(spiffe_id.trust_domain.id) not in issuer_ids:
        raise ValueError(f"{spiffe_id} is outside the issuer's trust domain ({issuer_ids[0]})")
    now = _utc(now)
    not_before, not_after = _window(issuer_cert, now, _utc(not_after))
    serial = new_serial()
    if issuer.template is not None and not dns_names:
        tbs = issuer.template.tbs(public_key, str(spiffe_id), serial, not_before, not_after)
        return x509.load_der_x509_certificate(issuer.template.sign(tbs))
    return _build_svid(issuer, public_key, spiffe_id, serial, not_before, not_after, dns_names)


def _build_svid(
    issuer: PreparedIssuer,
    public_key: PublicKey,
    spiffe_id: SpiffeId,
    serial: int,
    not_before: datetime,
    not_after: datetime,
    dns_names: Sequence[str] = (),
) -> x509.Certificate:
    """The X509-SVID as cryptography's ``CertificateBuilder`` encodes it."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    names.extend(_dns_or_ip(name) for name in dns_names)
    subject = x509.Name([])
    if dns_names and len(dns_names[0]) <= 64:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    builder = (
        _base(subject, issuer.subject, public_key, serial, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(rsa_key=is_rsa), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(issuer.authority_key_id, critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=len(subject) == 0)
    )
    return builder.sign(issuer.key, issuer.algorithm.hash_algorithm())


def _leaf_key_usage(*, rsa_key: bool) -> x509.KeyUsage:
    """digitalSignature, plus keyEncipherment for an RSA key (X509-SVID 4.3)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _svid_template(issuer: PreparedIssuer) -> SvidTemplate | None:
    """The issuer's DER template, if it reproduces the builder's encoding of a reference
    leaf byte for byte (else None, and the builder signs every leaf)."""
    cert = issuer.certificate
    not_before = cert.not_valid_before_utc
    not_after = min(not_before + timedelta(hours=1), cert.not_valid_after_utc)
    subject_key = KeyAlgorithm.EC_P256.generate().public_key()
    spiffe_id = SpiffeId.parse(f"{issuer.spiffe_ids[0]}/meshca/template-check")
    serial = new_serial()
    reference = _build_svid(issuer, subject_key, spiffe_id, serial, not_before, not_after)
    try:
        template = SvidTemplate.create(
            issuer.key,
            issuer.algorithm.hash_algorithm(),
            reference,
            _leaf_key_usage(rsa_key=True),
        )
        built = template.tbs(subject_key, str(spiffe_id), serial, not_before, not_after)
    except (ValueError, KeyError, IndexError):
        return None
    return template if built == reference.tbs_certificate_bytes else None


def _signing_key(issuer: Signer | PrivateKey) -> tuple[PrivateKey, KeyAlgorithm]:
    if isinstance(issuer, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return issuer, KeyAlgorithm.of(issuer)
    return as_private_key(issuer), issuer.algorithm


def _check_issuer(
    key: PrivateKey, issuer_cert: x509.Certificate, *, child_path_length: int | None
) -> None:
    """Refuse to sign with a key that is not the issuer certificate's, or a non-CA."""
    if issuer_cert.public_key() != key.public_key():
        subject = issuer_cert.subject.rfc4514_string()
        raise ValueError(f"the signing key does not match the issuer certificate {subject}")
    try:
        constraints = issuer_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ValueError(f"issuer {issuer_cert.subject.rfc4514_string()} is not a CA certificate")
    limit = constraints.path_length
    if child_path_length is not None and limit is not None and child_path_length >= limit:
        raise ValueError(
            f"issuer path length {limit} does not allow a CA with path length {child_path_length}"
        )


def _utc(when: datetime) -> datetime:
    """UTC, truncated to whole seconds as X.509 time is (RFC 5280 4.1.2.5)."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"datetime {when.isoformat()} must be timezone-aware")
    return when.astimezone(UTC).replace(microsecond=0)


def _window(
    issuer_cert: x509.Certificate, now: datetime, wanted_not_after: datetime
) -> tuple[datetime, datetime]:
    """Backdate for skew, but keep the validity inside the issuer's (RFC 5280 6.1.3)."""
    not_before = max(now - CLOCK_SKEW, issuer_cert.not_valid_before_utc)
    not_after = min(wanted_not_after, issuer_cert.not_valid_after_utc)
    if not_after <= now or not_after <= not_before:
        raise ValueError(
            f"no validity left: notAfter would be {not_after.isoformat()} at {now.isoformat()} "
            f"(issuer valid until {issuer_cert.not_valid_after_utc.isoformat()})"
        )
    return not_before, not_after


def _base(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: PublicKey,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _ca_subject(trust_domain: TrustDomain, role: str, serial: int) -> x509.Name:
    """``O=<td>, CN=<role> <first 8 hex digits of the serial>``: names the trust domain,
    tells roots from intermediates and each rotation from the last."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain.name[:64]),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{role} {format(serial, 'x')[:8]}"),
        ]
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _uri_san(spiffe_id: SpiffeId) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))])


def _aki(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        issuer_key = issuer_cert.public_key()
        if not isinstance(issuer_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise ValueError("issuer key is neither ECDSA nor RSA") from None
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _dns_or_ip(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
