"""Certificate signing requests: parse strictly, then check what the CSR asks for.

A CSR (PKCS#10, RFC 2986) does one job in meshca: it proves that the caller holds the
private key for the public key it carries. The CA, not the CSR, decides the identity
(the leaf profile in :mod:`meshca.pki.profile`), so a CSR may carry no SAN at all; if it
names a SPIFFE ID it must be the caller's own. A CSR that asks for a CA certificate, for
another identity, for extra names or for extensions the CA does not understand is
refused, never silently trimmed: the caller learns exactly what was wrong.

Every refusal is a :class:`~meshca.errors.CSRError` whose ``reason`` is one of:

``csr_too_large``          more than :data:`MAX_CSR_BYTES` bytes (checked before parsing)
``csr_malformed``          not one PEM block or one DER structure of a PKCS#10 request
``csr_key_not_allowed``    a key other than ECDSA P-256/P-384 or RSA 2048/3072/4096
``csr_weak_signature``     signed with a digest other than SHA-256/384/512 (SHA-1, MD5)
``csr_bad_signature``      the self-signature does not verify: no proof of possession
``csr_identity_mismatch``  a URI SAN other than the caller's SPIFFE ID
``csr_extra_san``          a second URI SAN, or any DNS, IP, email or other SAN
``csr_requests_ca``        BasicConstraints CA:true, or KeyUsage keyCertSign/cRLSign
``csr_unknown_extension``  an extension outside the allowed set (the OID is named)
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtensionOID

from meshca.errors import CSRError
from meshca.pki.keys import ALLOWED_DESCRIPTION, KeyAlgorithm, PublicKey, UnsupportedKeyError
from meshca.spiffe import SpiffeId

MAX_CSR_BYTES = 16 * 1024
"""Largest CSR accepted, PEM or DER. A real CSR for an RSA-4096 key is under 2 KiB."""

REASONS = (
    "csr_too_large",
    "csr_malformed",
    "csr_key_not_allowed",
    "csr_weak_signature",
    "csr_bad_signature",
    "csr_identity_mismatch",
    "csr_extra_san",
    "csr_requests_ca",
    "csr_unknown_extension",
)

ALLOWED_EXTENSIONS = {
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME: "subjectAltName",
    ExtensionOID.BASIC_CONSTRAINTS: "basicConstraints (CA:false)",
    ExtensionOID.KEY_USAGE: "keyUsage",
    ExtensionOID.EXTENDED_KEY_USAGE: "extendedKeyUsage",
}

_PEM_LABELS = (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")

ALLOWED_SIGNATURE_HASHES: dict[type[hashes.HashAlgorithm], str] = {
    hashes.SHA256: "SHA-256",
    hashes.SHA384: "SHA-384",
    hashes.SHA512: "SHA-512",
}
"""Digests a CSR's self-signature may use. SHA-1 and MD5 admit chosen-prefix collisions,
so a signature over them no longer proves possession of the key (RFC 6151, RFC 9155)."""

# What cryptography raises on a structure it cannot read. None of these mean a bug in
# meshca: they all mean the caller sent something that is not a usable request.
_PARSE_ERRORS = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.InvalidVersion,
    x509.UnsupportedGeneralNameType,
)


def _malformed(detail: str) -> CSRError:
    return CSRError(
        f"CSR is malformed: {detail}; send one PKCS#10 certificate request, "
        "PEM ('-----BEGIN CERTIFICATE REQUEST-----') or DER",
        reason="csr_malformed",
    )


def _as_bytes(data: bytes | str) -> bytes:
    if isinstance(data, str):
        if len(data) > MAX_CSR_BYTES:  # each character is at least one byte
            raise _too_large(len(data))
        try:
            data = data.encode("ascii")
        except UnicodeEncodeError:
            raise _malformed("the text has non-ASCII characters") from None
    if len(data) > MAX_CSR_BYTES:
        raise _too_large(len(data))
    return bytes(data)


def _too_large(size: int) -> CSRError:
    return CSRError(
        f"CSR is {size} bytes; the limit is {MAX_CSR_BYTES} bytes",
        reason="csr_too_large",
    )


def _check_single_pem_block(data: bytes) -> None:
    """RFC 7468 textual encoding, strictly: exactly one block and nothing around it."""
    text = data.strip()
    begins = text.count(b"-----BEGIN ")
    ends = text.count(b"-----END ")
    if begins > 1 or ends > 1:
        raise _malformed(f"the PEM text has {max(begins, ends)} blocks")
    if begins == 0 or ends == 0:
        raise _malformed("the PEM text has no complete BEGIN/END block")
    if not text.startswith(b"-----BEGIN "):
        raise _malformed("there is text before the PEM block")
    if not text.endswith(b"-----"):
        raise _malformed("there is text after the PEM block")
    label = text[len(b"-----BEGIN ") :].split(b"-----", 1)[0]
    if label not in _PEM_LABELS:
        shown = label.decode("ascii", "replace")[:40]
        raise _malformed(f"the PEM block is {shown!r}, not 'CERTIFICATE REQUEST'")
    for line in text.splitlines()[1:-1]:
        if b":" in line:
            header = line.split(b":", 1)[0].strip().decode("ascii", "replace")[:40]
            raise _malformed(
                f"the PEM block has an RFC 1421 header ({header!r}); RFC 7468 PEM carries "
                "only base64 (an encrypted or annotated block is not a certificate request)"
            )


def load_csr(data: bytes | str) -> x509.CertificateSigningRequest:
    """Parse one PKCS#10 request from PEM or DER, refusing anything around it.

    The size limit is checked before any parsing. PEM must be exactly one
    ``CERTIFICATE REQUEST`` block (RFC 7468 section 7) with only whitespace around it;
    DER must be one structure with no trailing bytes. Raises CSRError (``csr_too_large``
    or ``csr_malformed``) and nothing else.
    """
    raw = _as_bytes(data)
    if not raw.strip():
        raise _malformed("it is empty")
    if raw.lstrip().startswith(b"-----"):
        _check_single_pem_block(raw)
        try:
            return x509.load_pem_x509_csr(raw)
        except _PARSE_ERRORS:
            raise _malformed("the PEM block is not base64 of a DER certificate request") from None
    if raw[0] != 0x30:  # every DER CertificationRequest starts with a SEQUENCE tag
        if b"-----BEGIN" in raw:
            raise _malformed("there is text before the PEM block")
        raise _malformed("it is neither PEM nor DER")
    try:
        return x509.load_der_x509_csr(raw)
    except _PARSE_ERRORS as exc:
        raise _malformed(f"the DER does not parse ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _check_key(csr: x509.CertificateSigningRequest) -> PublicKey:
    try:
        key = csr.public_key()
    except _PARSE_ERRORS:
        raise CSRError(
            f"CSR key has an unsupported or unreadable algorithm ({_key_oid(csr)}); "
            f"allowed: {ALLOWED_DESCRIPTION}",
            reason="csr_key_not_allowed",
        ) from None
    try:
        KeyAlgorithm.of(key)
    except UnsupportedKeyError as exc:
        raise CSRError(f"CSR {exc}", reason="csr_key_not_allowed") from None
    assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)  # KeyAlgorithm.of
    return key


def _key_oid(csr: x509.CertificateSigningRequest) -> str:
    try:  # not in cryptography's type stubs for CSRs, though present at run time
        oid = getattr(csr, "public_key_algorithm_oid", None)
    except _PARSE_ERRORS:
        oid = None
    return oid.dotted_string if isinstance(oid, x509.ObjectIdentifier) else "unknown OID"


def _check_signature(csr: x509.CertificateSigningRequest, key: PublicKey) -> None:
    """RFC 2986 section 3: the request is signed with the subject's own private key
    (``key``, already checked), with a digest from :data:`ALLOWED_SIGNATURE_HASHES`."""
    try:
        digest = csr.signature_hash_algorithm
    except _PARSE_ERRORS:
        digest = None  # an unknown algorithm: the verification below fails and says so
    if digest is not None and type(digest) not in ALLOWED_SIGNATURE_HASHES:
        allowed = ", ".join(ALLOWED_SIGNATURE_HASHES.values())
        raise CSRError(
            f"CSR is signed with {_digest_name(digest)}, which is refused; allowed: "
            f"{allowed}; sign the CSR again with one of them (e.g. openssl req -sha256)",
            reason="csr_weak_signature",
        )
    if digest is None or not _verifies(csr, key, digest):
        raise CSRError(
            "CSR signature does not verify with the CSR's own public key, so it does not "
            "prove possession of the private key; sign the CSR with the key it carries",
            reason="csr_bad_signature",
        )


def _verifies(
    csr: x509.CertificateSigningRequest, key: PublicKey, digest: hashes.HashAlgorithm
) -> bool:
    """The signature check of ``CertificateSigningRequest.is_signature_valid``, with the
    key already parsed: the padding (PKCS#1 v1.5 or PSS) or ECDSA from the CSR's own
    signature algorithm, as cryptography documents for verifying a signature by hand."""
    try:
        parameters = csr.signature_algorithm_parameters
        if isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(parameters, ec.ECDSA):
                return False
            key.verify(csr.signature, csr.tbs_certrequest_bytes, parameters)
        else:
            if not isinstance(parameters, padding.PKCS1v15 | padding.PSS):
                return False
            key.verify(csr.signature, csr.tbs_certrequest_bytes, parameters, digest)
    except (InvalidSignature, *_PARSE_ERRORS):
        return False
    return True


def _digest_name(digest: hashes.HashAlgorithm) -> str:
    names = {"sha1": "SHA-1", "md5": "MD5", "sha224": "SHA-224"}
    return names.get(digest.name, digest.name.upper())


def _check_san(san: x509.SubjectAlternativeName, expected: SpiffeId) -> None:
    others = [name for name in san if not isinstance(name, x509.UniformResourceIdentifier)]
    if others:
        listed = ", ".join(_describe_name(name) for name in others[:5])
        raise CSRError(
            f"CSR asks for SANs the CA does not issue ({listed}); the only SAN allowed is "
            f"the URI {expected}",
            reason="csr_extra_san",
        )
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) > 1:
        raise CSRError(
            f"CSR has {len(uris)} URI SANs; an X509-SVID has exactly one "
            f"(SPIFFE X509-SVID section 2), and it may only be {expected}",
            reason="csr_extra_san",
        )
    if uris and uris[0] != str(expected):
        raise CSRError(
            f"CSR asks for the identity {uris[0][:200]!r}, but the caller is {expected}; "
            "omit the URI SAN or set it to the caller's own SPIFFE ID",
            reason="csr_identity_mismatch",
        )


def _describe_name(name: x509.GeneralName) -> str:
    kinds: dict[type[x509.GeneralName], str] = {
        x509.DNSName: "DNS",
        x509.IPAddress: "IP",
        x509.RFC822Name: "email",
        x509.DirectoryName: "directoryName",
        x509.RegisteredID: "registeredID",
        x509.OtherName: "otherName",
    }
    kind = kinds.get(type(name), type(name).__name__)
    if isinstance(name, x509.OtherName):
        text = name.type_id.dotted_string
    elif isinstance(name, x509.RegisteredID):
        text = name.value.dotted_string
    elif isinstance(name, x509.DirectoryName):
        text = name.value.rfc4514_string()
    else:
        text = str(name.value)
    text = text[:80]
    return f"{kind}:{text if text.isprintable() else repr(text)}"


def check_csr(csr: x509.CertificateSigningRequest, expected: SpiffeId) -> PublicKey:
    """Check that ``csr`` may be signed for the caller ``expected``; return its public key.

    In order: the key is an allowed algorithm and size
    (:class:`~meshca.pki.keys.KeyAlgorithm`); the signature uses SHA-256, SHA-384 or
    SHA-512 and verifies (proof of possession, RFC 2986 section 3); the extension
    request holds only subjectAltName, basicConstraints with CA:false, keyUsage without
    keyCertSign or cRLSign, and extendedKeyUsage; the SAN, if present, holds at most one
    name, a URI equal to ``expected``. The subject DN is ignored: the CA sets its own.
    Raises CSRError with one of the reasons listed in this module's docstring.
    """
    key = _check_key(csr)
    _check_signature(csr, key)
    try:
        extensions = list(csr.extensions)
    except _PARSE_ERRORS as exc:
        raise _malformed(f"its extension request cannot be read ({_short(exc)})") from None
    for ext in extensions:
        value = ext.value
        if ext.oid not in ALLOWED_EXTENSIONS:
            name = getattr(ext.oid, "_name", "Unknown OID")
            label = (
                ext.oid.dotted_string
                if name == "Unknown OID"
                else f"{name} ({ext.oid.dotted_string})"
            )
            raise CSRError(
                f"CSR requests extension {label}, which the CA does not issue; allowed: "
                + ", ".join(ALLOWED_EXTENSIONS.values()),
                reason="csr_unknown_extension",
            )
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise CSRError(
                "CSR asks for a CA certificate (basicConstraints CA:true); the CA issues "
                "leaf certificates only: omit basicConstraints or set CA:false",
                reason="csr_requests_ca",
            )
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise CSRError(
                "CSR asks for CA key usages (keyCertSign or cRLSign); leaf certificates "
                "never carry them (SPIFFE X509-SVID section 4.3)",
                reason="csr_requests_ca",
            )
        if isinstance(value, x509.SubjectAlternativeName):
            _check_san(value, expected)
    return key


def csr_sha256(data: bytes | str | x509.CertificateSigningRequest) -> str:
    """Lowercase hex SHA-256 of the CSR's DER encoding, as recorded in the ledger.

    PEM and DER of the same request give the same digest. Raises CSRError like
    :func:`load_csr` when given bytes or text that do not parse.
    """
    csr = data if isinstance(data, x509.CertificateSigningRequest) else load_csr(data)
    return hashlib.sha256(csr.public_bytes(serialization.Encoding.DER)).hexdigest()
