"""Client certificates named after their defect, made with cryptography for each test.

expired            a valid SVID of the trust domain whose notAfter has passed
other-domain       an SVID from another trust domain's CA (not in our bundle)
self-signed        a self-signed certificate carrying our trust domain's SPIFFE ID
two-uri-sans       signed by our CA, with two SPIFFE IDs in the SAN
ca-true-leaf       signed by our CA, a SPIFFE ID but BasicConstraints CA:true
cert-sign-leaf     signed by our CA, CA:false but KeyUsage keyCertSign (X509-SVID 4.3)
foreign-id         signed by our CA (which federates nothing) but naming another domain
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshca.pki.keys import KeyAlgorithm, PrivateKey
from meshca.spiffe import TrustDomain
from tests.agent.support import LocalCA
from tests.proxy.support import FRONTEND, Files


def _leaf(
    issuer_key: PrivateKey,
    issuer_name: x509.Name,
    uris: list[str],
    *,
    ca: bool = False,
    cert_sign: bool = False,
    key: PrivateKey | None = None,
    expired: bool = False,
) -> tuple[PrivateKey, x509.Certificate]:
    key = key or KeyAlgorithm.EC_P256.generate()
    now = datetime.now(UTC) - (timedelta(hours=2) if expired else timedelta(0))
    cert = (
        x509.CertificateBuilder()
        .subject_name(issuer_name if key is issuer_key else x509.Name([]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=cert_sign,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True,
        )
        .sign(issuer_key, hashes.SHA256())
    )
    return key, cert


def bad_client(ca: LocalCA, directory: Path, defect: str) -> Files:
    """The files of a client certificate with ``defect`` (see the module docstring)."""
    roots = (ca.root,)
    if defect == "other-domain":
        other = LocalCA(TrustDomain("other.example"))
        key, chain = other.issue(other.trust_domain.workload("shop", "frontend"))
        return Files(directory, defect, key, chain, roots)
    if defect == "self-signed":
        key = KeyAlgorithm.EC_P256.generate()
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "self")])
        _, cert = _leaf(key, name, [str(FRONTEND)], key=key)
        return Files(directory, defect, key, (cert,), roots)
    inter = ca.intermediate.subject
    if defect == "expired":
        key, cert = _leaf(ca.inter_key, inter, [str(FRONTEND)], expired=True)
    elif defect == "two-uri-sans":
        key, cert = _leaf(
            ca.inter_key, inter, [str(FRONTEND), str(FRONTEND.trust_domain.workload("x", "y"))]
        )
    elif defect == "ca-true-leaf":
        key, cert = _leaf(ca.inter_key, inter, [str(FRONTEND)], ca=True)
    elif defect == "cert-sign-leaf":
        key, cert = _leaf(ca.inter_key, inter, [str(FRONTEND)], cert_sign=True)
    elif defect == "foreign-id":
        key, cert = _leaf(ca.inter_key, inter, ["spiffe://other.example/ns/shop/sa/frontend"])
    else:
        raise ValueError(defect)
    return Files(directory, defect, key, (cert, ca.intermediate), roots)
