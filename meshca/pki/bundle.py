"""Trust bundles: the CA certificates relying parties trust, as PEM or SPIFFE bundle JSON.

The SPIFFE bundle is a JWK Set (SPIFFE Trust Domain and Bundle, section 4) with one JWK
per CA certificate (X509-SVID, section 6.1): ``use`` is ``x509-svid``, there is no
``kid``, and ``x5c`` holds exactly that certificate (standard base64 of its DER). The key
parameters (``kty``, ``crv``/``x``/``y`` or ``n``/``e``) come from PyJWT, so no JWK field
is encoded by hand here. ``spiffe_sequence`` and ``spiffe_refresh_hint`` (seconds) are
the optional top-level members of section 4.1.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from datetime import timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

from meshca.pki.profile import uri_sans
from meshca.spiffe import TrustDomain

X509_SVID_USE = "x509-svid"

_KEY_PARAMS = {"EC": ("kty", "crv", "x", "y"), "RSA": ("kty", "n", "e")}


def bundle_pem(certs: Sequence[x509.Certificate]) -> str:
    """The certificates as concatenated PEM blocks, in the order given."""
    return "".join(cert.public_bytes(serialization.Encoding.PEM).decode("ascii") for cert in certs)


def spiffe_bundle(
    trust_domain: TrustDomain,
    certs: Sequence[x509.Certificate],
    *,
    sequence: int | None = None,
    refresh_hint: timedelta | None = None,
) -> dict[str, object]:
    """The SPIFFE bundle document for ``trust_domain``'s CA certificates.

    Each certificate must be a CA certificate (X509-SVID 6.1: the entry represents a CA)
    with an ECDSA or RSA key; one whose SPIFFE ID names another trust domain is refused
    (Trust Domain and Bundle 6.4: keep one bundle per trust domain). Raises ValueError.
    The refresh hint is rounded up to whole seconds, at least one.
    """
    keys: list[dict[str, object]] = []
    for cert in certs:
        _check_ca(cert, trust_domain)
        jwk = _key_params(cert.public_key())
        jwk["use"] = X509_SVID_USE
        der = cert.public_bytes(serialization.Encoding.DER)
        jwk["x5c"] = [base64.b64encode(der).decode("ascii")]
        keys.append(jwk)
    doc: dict[str, object] = {"keys": keys}
    if sequence is not None:
        if sequence < 0:
            raise ValueError(f"spiffe_sequence must be >= 0, got {sequence}")
        doc["spiffe_sequence"] = sequence
    if refresh_hint is not None:
        doc["spiffe_refresh_hint"] = max(1, math.ceil(refresh_hint.total_seconds()))
    return doc


def parse_spiffe_bundle(
    doc: Mapping[str, object] | str | bytes, *, strict: bool = True
) -> list[x509.Certificate]:
    """The X.509 CA certificates in a SPIFFE bundle document (JSON text or parsed).

    Entries whose ``use`` or ``kty`` is not understood are skipped, as Trust Domain and
    Bundle 4.1.3 and 4.2 require. For ``x509-svid`` entries, ``strict`` (the default,
    for bundles meshca itself publishes) demands what X509-SVID 6.1 says a publisher
    must do: ``x5c`` with exactly one certificate, no ``kid``, and key parameters equal
    to the certificate's key. With ``strict=False`` the consumer rules of X509-SVID 6.2
    apply instead: an entry without ``x5c`` is skipped and only its first certificate is
    used. Raises ValueError naming the entry and the problem.
    """
    if isinstance(doc, str | bytes):
        try:
            doc = json.loads(doc)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"SPIFFE bundle is not JSON: {exc}") from None
    if not isinstance(doc, Mapping):
        raise ValueError("SPIFFE bundle must be a JSON object")
    entries = doc.get("keys")
    if not isinstance(entries, list):
        raise ValueError("SPIFFE bundle has no 'keys' array (Trust Domain and Bundle 4.1.3)")
    certs: list[x509.Certificate] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"SPIFFE bundle keys[{index}] is not a JSON object")
        if entry.get("use") != X509_SVID_USE or entry.get("kty") not in _KEY_PARAMS:
            continue
        cert = _entry_certificate(index, entry, strict=strict)
        if cert is not None:
            certs.append(cert)
    return certs


def _entry_certificate(
    index: int, entry: Mapping[object, object], *, strict: bool
) -> x509.Certificate | None:
    where = f"SPIFFE bundle keys[{index}]"
    chain = entry.get("x5c")
    if not isinstance(chain, list) or not chain:
        if strict:
            raise ValueError(f"{where} has no x5c certificate (X509-SVID 6.1)")
        return None
    if strict and len(chain) != 1:
        raise ValueError(f"{where} x5c holds {len(chain)} certificates; exactly one is allowed")
    if strict and "kid" in entry:
        raise ValueError(f"{where} sets 'kid', which an x509-svid entry must not (X509-SVID 6.1)")
    if not isinstance(chain[0], str):
        raise ValueError(f"{where} x5c[0] is not a string")
    try:
        der = base64.b64decode(chain[0], validate=True)
        cert = x509.load_der_x509_certificate(der)
        public_key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:  # binascii.Error is a ValueError
        raise ValueError(f"{where} x5c[0] is not a usable base64 DER certificate: {exc}") from None
    if strict:
        try:
            expected = _key_params(public_key)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        given = {name: entry.get(name) for name in expected}
        if given != expected:
            raise ValueError(f"{where} key parameters do not match its x5c certificate's key")
    return cert


def _key_params(public_key: object) -> dict[str, object]:
    """``kty`` and the public key members (RFC 7518 6.2.1, 6.3.1), from PyJWT."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
        elif isinstance(public_key, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public_key, as_dict=True)
        else:
            raise ValueError(f"a bundle key must be ECDSA or RSA, not {type(public_key).__name__}")
    except InvalidKeyError as exc:
        raise ValueError(f"the key cannot be expressed as a JWK: {exc}") from None
    assert isinstance(jwk, dict)
    # Only the key members: PyJWT adds key_ops, which RFC 7517 4.3 says not to mix with use.
    return {name: jwk[name] for name in _KEY_PARAMS[str(jwk["kty"])]}


def _check_ca(cert: x509.Certificate, trust_domain: TrustDomain) -> None:
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ValueError(
            f"{cert.subject.rfc4514_string() or 'certificate'} is not a CA certificate; "
            "a trust bundle holds CA certificates only"
        )
    for uri in uri_sans(cert):
        prefix = "spiffe://"
        if uri.startswith(prefix) and uri[len(prefix) :].split("/")[0] != trust_domain.name:
            raise ValueError(f"CA certificate {uri} is not in trust domain {trust_domain}")
