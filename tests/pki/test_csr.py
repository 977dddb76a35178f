"""CSR checks: the named bad corpus, good CSRs from two implementations, and properties.

The corpus lives in tests/vectors/csr (see its README.md); every file there must be
refused with the reason listed in VECTOR_REASONS.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshca.errors import CSRError
from meshca.pki.csr import MAX_CSR_BYTES, REASONS, check_csr, csr_sha256, load_csr
from meshca.pki.keys import KeyAlgorithm, PrivateKey
from meshca.spiffe import SpiffeId
from tests.pki.helpers import OPENSSL, key, needs_openssl

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "csr"
CALLER = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/workload")

VECTOR_REASONS = {
    "csr-asks-for-ca-true.pem": "csr_requests_ca",
    "csr-asks-for-key-cert-sign.pem": "csr_requests_ca",
    "csr-rsa-1024.pem": "csr_key_not_allowed",
    "csr-ed25519.pem": "csr_key_not_allowed",
    "csr-p521.pem": "csr_key_not_allowed",
    "csr-secp256k1.pem": "csr_key_not_allowed",
    "csr-dsa-2048.pem": "csr_key_not_allowed",
    "csr-dns-san.pem": "csr_extra_san",
    "csr-ip-san.pem": "csr_extra_san",
    "csr-email-san.pem": "csr_extra_san",
    "csr-two-uri-sans.pem": "csr_extra_san",
    "csr-other-spiffe-id.pem": "csr_identity_mismatch",
    "csr-other-trust-domain.pem": "csr_identity_mismatch",
    "csr-non-spiffe-uri.pem": "csr_identity_mismatch",
    "csr-unknown-extension.pem": "csr_unknown_extension",
    "csr-name-constraints.pem": "csr_unknown_extension",
    "csr-signed-with-sha1.pem": "csr_weak_signature",
    "csr-signed-with-md5.pem": "csr_weak_signature",
    "csr-bad-signature.pem": "csr_bad_signature",
    "csr-not-pem.txt": "csr_malformed",
    "csr-empty.txt": "csr_malformed",
    "csr-truncated.der": "csr_malformed",
    "csr-trailing-garbage.der": "csr_malformed",
    "csr-trailing-garbage.pem": "csr_malformed",
    "csr-text-before-pem.pem": "csr_malformed",
    "csr-two-pem-blocks.pem": "csr_malformed",
    "csr-certificate-not-csr.pem": "csr_malformed",
    "csr-bad-base64.pem": "csr_malformed",
    "csr-pem-encrypted-headers.pem": "csr_malformed",
    "csr-oversize.pem": "csr_too_large",
}


def refuse(data: bytes | str) -> CSRError:
    with pytest.raises(CSRError) as info:
        check_csr(load_csr(data), CALLER)
    return info.value


def build(
    private: PrivateKey,
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
    subject: x509.Name | None = None,
) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    for value, critical in extensions or []:
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(private, KeyAlgorithm.of(private).hash_algorithm())


def caller_san() -> tuple[x509.ExtensionType, bool]:
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(CALLER))]), False


def pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


# -- the named corpus ------------------------------------------------------------------


def test_every_vector_file_has_an_expected_reason() -> None:
    on_disk = {p.name for p in VECTORS.iterdir() if p.name.startswith("csr-")}
    assert on_disk == set(VECTOR_REASONS)
    assert set(VECTOR_REASONS.values()) == set(REASONS)  # every reason has a vector


@pytest.mark.parametrize(("name", "reason"), sorted(VECTOR_REASONS.items()))
def test_vector_is_refused_with_its_reason(name: str, reason: str) -> None:
    error = refuse((VECTORS / name).read_bytes())
    assert error.reason == reason
    assert error.message.startswith("CSR ")


def test_weak_key_message_says_what_it_is_and_what_is_allowed() -> None:
    error = refuse((VECTORS / "csr-rsa-1024.pem").read_bytes())
    assert error.message == (
        "CSR key is RSA-1024; allowed: ECDSA P-256, ECDSA P-384, RSA 2048, RSA 3072, RSA 4096"
    )


def test_unknown_extension_message_names_the_oid() -> None:
    error = refuse((VECTORS / "csr-unknown-extension.pem").read_bytes())
    assert "1.3.6.1.4.1.55555.1.1" in error.message
    assert "subjectAltName" in error.message  # and what is allowed


def test_identity_mismatch_names_both_identities() -> None:
    error = refuse((VECTORS / "csr-other-spiffe-id.pem").read_bytes())
    assert "spiffe://cluster.local/ns/kube-system/sa/admin" in error.message
    assert str(CALLER) in error.message


def test_extra_san_message_names_the_extra_name() -> None:
    assert "DNS:evil.example.com" in refuse((VECTORS / "csr-dns-san.pem").read_bytes()).message


@pytest.mark.parametrize(
    ("name", "algorithm"),
    [("csr-signed-with-sha1.pem", "SHA-1"), ("csr-signed-with-md5.pem", "MD5")],
)
def test_weak_signature_digest_is_named_not_called_a_bad_signature(
    name: str, algorithm: str
) -> None:
    error = refuse((VECTORS / name).read_bytes())
    assert error.message.startswith(f"CSR is signed with {algorithm}, which is refused; ")
    assert "allowed: SHA-256, SHA-384, SHA-512" in error.message
    assert "possession" not in error.message


def test_pem_encapsulated_headers_are_named() -> None:
    error = refuse((VECTORS / "csr-pem-encrypted-headers.pem").read_bytes())
    assert "RFC 1421 header ('Proc-Type')" in error.message


@pytest.mark.parametrize("digest", ["-sha256", "-sha384", "-sha512"])
@needs_openssl
def test_csr_signed_with_an_allowed_digest_is_accepted(tmp_path: Path, digest: str) -> None:
    private = key(KeyAlgorithm.EC_P256, 0)
    data = _openssl_csr(tmp_path, private, f"subjectAltName=URI:{CALLER}", digest=digest)
    assert check_csr(load_csr(data), CALLER) == private.public_key()


def test_oversize_is_refused_before_parsing() -> None:
    # Not even PEM: if the size were checked after parsing this would be csr_malformed.
    error = refuse(b"\x00" * (MAX_CSR_BYTES + 1))
    assert error.reason == "csr_too_large"
    assert str(MAX_CSR_BYTES) in error.message
    assert refuse("x" * (MAX_CSR_BYTES + 1)).reason == "csr_too_large"


def test_size_limit_boundary() -> None:
    text = pem(build(key(KeyAlgorithm.EC_P256, 0), [caller_san()]))
    exactly = text + b"\n" * (MAX_CSR_BYTES - len(text))
    assert len(exactly) == MAX_CSR_BYTES
    check_csr(load_csr(exactly), CALLER)
    assert refuse(exactly + b"\n").reason == "csr_too_large"


def test_non_ascii_text_is_malformed() -> None:
    assert refuse("-----BEGIN CERTIFICATE REQUEST-----\né\n").reason == "csr_malformed"


# -- good CSRs -------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
@pytest.mark.parametrize("with_san", [True, False], ids=["caller-uri-san", "no-san"])
def test_good_csr_is_accepted(algorithm: KeyAlgorithm, with_san: bool) -> None:
    private = key(algorithm)
    csr = build(private, [caller_san()] if with_san else [])
    for data in (pem(csr), der(csr), pem(csr).decode()):
        public = check_csr(load_csr(data), CALLER)
        assert public == private.public_key()


def test_allowed_extensions_and_any_subject_are_accepted() -> None:
    private = key(KeyAlgorithm.RSA_2048, 0)
    csr = build(
        private,
        [
            caller_san(),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (
                x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                True,
            ),
            (
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                False,
            ),
        ],
        # The subject is ignored: the CA sets its own.
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root-of-everything")]),
    )
    assert isinstance(check_csr(load_csr(pem(csr)), CALLER), rsa.RSAPublicKey)


def test_pem_with_surrounding_whitespace_and_crlf_is_accepted() -> None:
    text = pem(build(key(KeyAlgorithm.EC_P256, 0), [caller_san()]))
    check_csr(load_csr(b"\r\n  " + text.replace(b"\n", b"\r\n") + b"\r\n\r\n"), CALLER)


def _openssl_csr(
    tmp_path: Path, private: PrivateKey, *addext: str, digest: str = "-sha256"
) -> bytes:
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    args = [OPENSSL, "req", "-new", digest, "-key", str(key_file), "-subj", "/CN=workload"]
    for value in addext:
        args += ["-addext", value]
    return subprocess.run(args, capture_output=True, check=True, timeout=30).stdout


@needs_openssl
@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_3072])
def test_csr_made_by_openssl_is_accepted(tmp_path: Path, algorithm: KeyAlgorithm) -> None:
    private = key(algorithm)
    data = _openssl_csr(tmp_path, private, f"subjectAltName=URI:{CALLER}")
    assert check_csr(load_csr(data), CALLER) == private.public_key()


def _flip_signature_bit(data: bytes) -> bytes:
    csr = load_csr(data)
    raw = bytearray(der(csr))
    at = bytes(raw).rindex(csr.signature) + len(csr.signature) // 2
    raw[at] ^= 0x01
    return bytes(raw)


@needs_openssl
@pytest.mark.parametrize("salt", ["32", "digest", "max"])
def test_rsa_pss_signed_csr_is_verified(tmp_path: Path, salt: str) -> None:
    """PSS CSRs (openssl req -sigopt rsa_padding_mode:pss) are checked with PSS; a flipped
    signature bit is refused as a bad signature, not accepted or crashed on."""
    private = key(KeyAlgorithm.RSA_2048)
    data = subprocess.run(
        [
            *_openssl_req_args(tmp_path, private),
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            f"rsa_pss_saltlen:{salt}",
            "-addext",
            f"subjectAltName=URI:{CALLER}",
        ],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    assert check_csr(load_csr(data), CALLER) == private.public_key()
    assert refuse(_flip_signature_bit(data)).reason == "csr_bad_signature"


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048])
def test_a_flipped_signature_bit_is_a_bad_signature(algorithm: KeyAlgorithm) -> None:
    data = der(build(key(algorithm), [caller_san()]))
    assert refuse(_flip_signature_bit(data)).reason == "csr_bad_signature"


def _openssl_req_args(tmp_path: Path, private: PrivateKey) -> list[str]:
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return [OPENSSL, "req", "-new", "-sha256", "-key", str(key_file), "-subj", "/CN=workload"]


@needs_openssl
def test_csr_made_by_openssl_asking_for_ca_is_refused(tmp_path: Path) -> None:
    data = _openssl_csr(tmp_path, key(KeyAlgorithm.EC_P256, 0), "basicConstraints=critical,CA:TRUE")
    assert refuse(data).reason == "csr_requests_ca"


def test_csr_sha256_is_the_digest_of_the_der() -> None:
    csr = build(key(KeyAlgorithm.EC_P256, 0), [caller_san()])
    expected = hashlib.sha256(der(csr)).hexdigest()
    assert csr_sha256(pem(csr)) == expected
    assert csr_sha256(pem(csr).decode()) == expected
    assert csr_sha256(der(csr)) == expected
    assert csr_sha256(csr) == expected
    with pytest.raises(CSRError):
        csr_sha256(b"junk")


# -- properties: any input gives a public key or a CSRError, nothing else ---------------


def check_any(data: bytes | str) -> None:
    try:
        public = check_csr(load_csr(data), CALLER)
    except CSRError as exc:
        assert exc.reason in REASONS
        assert exc.message
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    try:
        assert len(csr_sha256(data)) == 64
    except CSRError as exc:
        assert exc.reason in ("csr_too_large", "csr_malformed")


def _seeds() -> list[tuple[x509.CertificateSigningRequest, PrivateKey]]:
    ec_key, rsa_key = key(KeyAlgorithm.EC_P256, 6), key(KeyAlgorithm.RSA_2048, 6)
    full = [
        caller_san(),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.KeyUsage(True, False, False, False, False, False, False, False, False), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    ]
    return [
        (build(ec_key, full), ec_key),
        (build(ec_key), ec_key),
        (build(rsa_key, [caller_san()]), rsa_key),
    ]


SEEDS = _seeds()
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few random byte flips, insertions, deletions or a truncation."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            break
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, len(out) - 1))
        if op == "flip":
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            out[at] = draw(st.integers(0, 255))
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 8))]
        else:
            del out[at:]
    return bytes(out)


def _tlv(tag: int, body: bytes) -> bytes:
    """DER tag-length-value; test-only, to re-sign a mutated request body."""
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def resign(csr: x509.CertificateSigningRequest, private: PrivateKey, tbs: bytes) -> bytes:
    """A CSR whose (mutated) body carries a valid signature, so checks past it run."""
    original = der(csr)
    alg_and_sig = original[
        original.index(csr.tbs_certrequest_bytes) + len(csr.tbs_certrequest_bytes) :
    ]
    bit_string = _tlv(0x03, b"\x00" + csr.signature)
    assert alg_and_sig.endswith(bit_string)
    algorithm_id = alg_and_sig[: -len(bit_string)]
    digest = KeyAlgorithm.of(private).hash_algorithm()
    if isinstance(private, ec.EllipticCurvePrivateKey):
        signature = private.sign(tbs, ec.ECDSA(digest))
    else:
        signature = private.sign(tbs, padding.PKCS1v15(), digest)
    return _tlv(0x30, tbs + algorithm_id + _tlv(0x03, b"\x00" + signature))


def test_resign_rebuilds_an_identical_valid_csr() -> None:
    csr, private = SEEDS[0]
    rebuilt = resign(csr, private, csr.tbs_certrequest_bytes)
    assert load_csr(rebuilt).tbs_certrequest_bytes == csr.tbs_certrequest_bytes
    check_csr(load_csr(rebuilt), CALLER)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_only_ever_raise_csr_error(data: bytes) -> None:
    check_any(data)


@FUZZ
@given(st.text(max_size=2048))
def test_random_text_only_ever_raises_csr_error(data: str) -> None:
    check_any(data)


@FUZZ
@given(st.data())
def test_mutated_der_only_ever_raises_csr_error(data: st.DataObject) -> None:
    csr, _ = data.draw(st.sampled_from(SEEDS))
    check_any(data.draw(mutated(der(csr))))


@FUZZ
@given(st.data())
def test_mutated_pem_only_ever_raises_csr_error(data: st.DataObject) -> None:
    csr, _ = data.draw(st.sampled_from(SEEDS))
    check_any(data.draw(mutated(pem(csr))))


@FUZZ
@given(st.data())
def test_mutated_and_resigned_body_only_ever_raises_csr_error(data: st.DataObject) -> None:
    """Mutations that survive the signature check reach the extension checks."""
    csr, private = data.draw(st.sampled_from(SEEDS))
    tbs = data.draw(mutated(csr.tbs_certrequest_bytes))
    check_any(resign(csr, private, tbs))
