"""Regenerate the bad-CSR corpus in this directory.

    .venv/bin/python tests/vectors/csr/make_vectors.py [NAME ...]

With names, only those files are written. Every file is named after its defect;
README.md says how each was made and which CSRError reason meshca must give. The caller
these CSRs are checked against is spiffe://cluster.local/ns/default/sa/workload. Keys are
fresh on every run, so the bytes change but the defects do not; commit the output.
"""

from __future__ import annotations

import base64
import ipaddress
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import NameOID

HERE = Path(__file__).resolve().parent
CALLER = "spiffe://cluster.local/ns/default/sa/workload"
SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workload")])

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | dsa.DSAPrivateKey


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def build(
    key: Key,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    *,
    subject: x509.Name = SUBJECT,
) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, digest)


def san(*names: x509.GeneralName) -> tuple[x509.ExtensionType, bool]:
    return x509.SubjectAlternativeName(list(names)), False


def uri(value: str = CALLER) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(value)


def pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def good() -> x509.CertificateSigningRequest:
    return build(p256(), [san(uri())])


def flip_last_byte(data: bytes) -> bytes:
    """Corrupt the last byte of the signature value (the final bytes of the DER)."""
    return data[:-1] + bytes([data[-1] ^ 0x01])


def key_usage(*, cert_sign: bool) -> tuple[x509.ExtensionType, bool]:
    return (
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
        True,
    )


def oversize() -> bytes:
    """A well-formed, correctly signed CSR over 16 KiB: 600 DNS SANs."""
    names = [x509.DNSName(f"host-{i:04d}.example.com") for i in range(600)]
    return pem(build(p256(), [san(uri(), *names)]))


VECTORS: dict[str, Callable[[], bytes]] = {
    # csr_requests_ca
    "csr-asks-for-ca-true.pem": lambda: pem(
        build(p256(), [san(uri()), (x509.BasicConstraints(ca=True, path_length=None), True)])
    ),
    "csr-asks-for-key-cert-sign.pem": lambda: pem(
        build(p256(), [san(uri()), key_usage(cert_sign=True)])
    ),
    # csr_key_not_allowed
    "csr-rsa-1024.pem": lambda: pem(build(rsa.generate_private_key(65537, 1024), [san(uri())])),
    "csr-ed25519.pem": lambda: pem(build(ed25519.Ed25519PrivateKey.generate(), [san(uri())])),
    "csr-p521.pem": lambda: pem(build(ec.generate_private_key(ec.SECP521R1()), [san(uri())])),
    "csr-secp256k1.pem": lambda: pem(build(ec.generate_private_key(ec.SECP256K1()), [san(uri())])),
    "csr-dsa-2048.pem": lambda: pem(build(dsa.generate_private_key(2048), [san(uri())])),
    # csr_extra_san
    "csr-dns-san.pem": lambda: pem(build(p256(), [san(uri(), x509.DNSName("evil.example.com"))])),
    "csr-ip-san.pem": lambda: pem(
        build(p256(), [san(uri(), x509.IPAddress(ipaddress.ip_address("10.0.0.1")))])
    ),
    "csr-email-san.pem": lambda: pem(build(p256(), [san(uri(), x509.RFC822Name("a@example.com"))])),
    "csr-two-uri-sans.pem": lambda: pem(
        build(p256(), [san(uri(), uri("spiffe://cluster.local/ns/default/sa/other"))])
    ),
    # csr_identity_mismatch
    "csr-other-spiffe-id.pem": lambda: pem(
        build(p256(), [san(uri("spiffe://cluster.local/ns/kube-system/sa/admin"))])
    ),
    "csr-other-trust-domain.pem": lambda: pem(
        build(p256(), [san(uri("spiffe://evil.example/ns/default/sa/workload"))])
    ),
    "csr-non-spiffe-uri.pem": lambda: pem(build(p256(), [san(uri("https://example.com/"))])),
    # csr_unknown_extension
    "csr-unknown-extension.pem": lambda: pem(
        build(
            p256(),
            [
                san(uri()),
                (
                    x509.UnrecognizedExtension(
                        x509.ObjectIdentifier("1.3.6.1.4.1.55555.1.1"), b"\x05\x00"
                    ),
                    False,
                ),
            ],
        )
    ),
    "csr-name-constraints.pem": lambda: pem(
        build(
            p256(),
            [
                san(uri()),
                (
                    x509.NameConstraints([x509.UniformResourceIdentifier("evil.example")], None),
                    True,
                ),
            ],
        )
    ),
    # csr_weak_signature (OpenSSL 3 refuses MD5 with ECDSA keys, so that one is RSA)
    "csr-signed-with-sha1.pem": lambda: openssl_csr(p256(), "-sha1"),
    "csr-signed-with-md5.pem": lambda: openssl_csr(rsa.generate_private_key(65537, 2048), "-md5"),
    # csr_bad_signature
    "csr-bad-signature.pem": lambda: serialization_pem(flip_last_byte(der(good()))),
    # csr_malformed
    "csr-not-pem.txt": lambda: b"this is not a certificate signing request\n",
    "csr-empty.txt": lambda: b"",
    "csr-truncated.der": lambda: der(good())[:100],
    "csr-trailing-garbage.der": lambda: der(good()) + b"\x00\x01garbage",
    "csr-trailing-garbage.pem": lambda: pem(good()) + b"garbage after the block\n",
    "csr-text-before-pem.pem": lambda: b"Certificate Request:\n" + pem(good()),
    "csr-two-pem-blocks.pem": lambda: pem(good()) + pem(good()),
    "csr-certificate-not-csr.pem": lambda: certificate_pem(),
    "csr-bad-base64.pem": lambda: pem(good()).replace(b"M", b"!", 1),
    "csr-pem-encrypted-headers.pem": lambda: rfc1421_headers(pem(good())),
    # csr_too_large
    "csr-oversize.pem": oversize,
}


def serialization_pem(data: bytes) -> bytes:
    """PEM-armour DER without re-parsing it (the content is deliberately corrupt)."""
    body = "\n".join(textwrap.wrap(base64.b64encode(data).decode("ascii"), 64))
    return (
        f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n".encode()
    )


def openssl_csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, digest: str) -> bytes:
    """A CSR made by the openssl command line, signed with ``digest`` (e.g. ``-sha1``)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SystemExit("openssl is needed for the weak-signature vectors")
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "key.pem"
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        args = [openssl, "req", "-new", digest, "-key", str(key_file), "-subj", "/CN=workload"]
        args += ["-addext", f"subjectAltName=URI:{CALLER}"]
        return subprocess.run(args, capture_output=True, check=True, timeout=30).stdout


def rfc1421_headers(data: bytes) -> bytes:
    """A good PEM CSR with RFC 1421 encapsulated headers after its BEGIN line (the body
    is not actually encrypted: a lenient parser ignores the headers and accepts it)."""
    begin, rest = data.split(b"\n", 1)
    headers = b"Proc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF\n\n"
    return begin + b"\n" + headers + rest


def certificate_pem() -> bytes:
    """A self-signed certificate: right PEM syntax, wrong kind of object."""
    key = p256()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(SUBJECT)
        .issuer_name(SUBJECT)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def main(names: Sequence[str]) -> None:
    unknown = set(names) - set(VECTORS)
    if unknown:
        raise SystemExit(f"no such vector: {', '.join(sorted(unknown))}")
    for name, make in VECTORS.items():
        if names and name not in names:
            continue
        (HERE / name).write_bytes(make())
        print(f"wrote {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
