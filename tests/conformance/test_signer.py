"""What every Signer backend must do (the ``Signer`` protocol of meshca/signers/base.py).

Parametrised by ``signer_factory`` (conftest.py, one param per backend) and by every
KeyAlgorithm, so a new backend passes or fails exactly the same checks as ``file``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from meshca.errors import SignerError
from meshca.pki import profile
from meshca.pki.keys import KeyAlgorithm, PublicKey
from meshca.signers.base import Signer, as_private_key
from meshca.spiffe import TrustDomain
from tests.conformance.conftest import Outage
from tests.pki.helpers import key, needs_openssl, openssl_verify

ALGORITHMS = list(KeyAlgorithm)
TD = TrustDomain("cluster.local")
SignerFactory = Callable[[KeyAlgorithm], Signer]


@pytest.fixture(params=ALGORITHMS, ids=[a.value for a in ALGORITHMS])
def signer(request: pytest.FixtureRequest, signer_factory: SignerFactory) -> Signer:
    algorithm: KeyAlgorithm = request.param
    return signer_factory(algorithm)


def verify(public_key: PublicKey, algorithm: KeyAlgorithm, signature: bytes, data: bytes) -> None:
    """The X.509 signature scheme for the algorithm (see signers/base.py)."""
    digest = algorithm.hash_algorithm()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(digest))
    else:
        public_key.verify(signature, data, padding.PKCS1v15(), digest)


def test_signer_describes_itself(signer: Signer) -> None:
    assert isinstance(signer, Signer)
    assert signer.backend in ("file", "pkcs11", "gcpkms")
    assert isinstance(signer.key_id, str) and signer.key_id
    assert KeyAlgorithm.of(signer.public_key()) is signer.algorithm


def test_public_key_verifies_its_signatures(signer: Signer) -> None:
    data = b"meshca conformance " + os.urandom(32)
    signature = signer.sign(data)
    verify(signer.public_key(), signer.algorithm, signature, data)


def test_signature_does_not_verify_other_data(signer: Signer) -> None:
    signature = signer.sign(b"one message")
    with pytest.raises(InvalidSignature):
        verify(signer.public_key(), signer.algorithm, signature, b"another message")


def test_signature_format_matches_the_algorithm(signer: Signer) -> None:
    signature = signer.sign(b"format")
    if signer.algorithm.is_ec:
        assert signature[0] == 0x30  # DER SEQUENCE { r, s }, not raw r||s
    else:
        assert len(signature) == signer.algorithm.rsa_bits // 8


def test_empty_and_large_inputs_sign(signer: Signer) -> None:
    for data in (b"", os.urandom(1 << 20)):
        verify(signer.public_key(), signer.algorithm, signer.sign(data), data)


def test_public_key_is_stable(signer: Signer) -> None:
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert signer.public_key().public_bytes(der, spki) == signer.public_key().public_bytes(
        der, spki
    )


def test_repr_does_not_reveal_key_material(signer: Signer) -> None:
    text = repr(signer) + str(signer)
    assert "PRIVATE KEY" not in text


@needs_openssl
def test_certificate_signed_through_the_adapter_verifies_with_openssl(
    signer: Signer, tmp_path: Path
) -> None:
    """cryptography's CertificateBuilder signs through as_private_key; openssl checks it."""
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"conformance {signer.algorithm}")])
    public = signer.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(profile.new_serial())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(as_private_key(signer), signer.algorithm.hash_algorithm())
    )
    root.verify_directly_issued_by(root)
    result = openssl_verify(tmp_path, root, root, purpose=None, extra=["-check_ss_sig"])
    assert result.returncode == 0, result.stdout + result.stderr

    # And the meshca profile end to end: a leaf under this root, checked by openssl.
    leaf = profile.build_svid(
        signer,
        root,
        key(KeyAlgorithm.EC_P256, 2).public_key(),
        TD.workload("default", "workload"),
        not_after=now + timedelta(minutes=30),
        now=now,
    )
    result = openssl_verify(tmp_path, root, leaf)
    assert result.returncode == 0, result.stdout + result.stderr


def test_profile_root_built_by_the_signer_is_self_consistent(signer: Signer) -> None:
    now = datetime.now(UTC)
    root = profile.build_root(signer, TD, ttl=timedelta(days=1), now=now)
    root.verify_directly_issued_by(root)
    assert root.public_key() == signer.public_key()
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey | rsa.RSAPublicKey)


def test_concurrent_signing_from_threads_gives_valid_signatures(signer: Signer) -> None:
    messages = [f"message {i}".encode() + os.urandom(16) for i in range(48)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        signatures = list(pool.map(signer.sign, messages))
    public = signer.public_key()
    for data, signature in zip(messages, signatures, strict=True):
        verify(public, signer.algorithm, signature, data)


async def test_signing_off_the_event_loop(signer: Signer) -> None:
    """How async callers use a Signer: asyncio.to_thread, several at once."""
    messages = [os.urandom(24) for _ in range(8)]
    signatures = await asyncio.gather(*(asyncio.to_thread(signer.sign, m) for m in messages))
    for data, signature in zip(messages, signatures, strict=True):
        verify(signer.public_key(), signer.algorithm, signature, data)


def test_backend_outage_is_a_signer_error_then_recovers(outage: Outage) -> None:
    """While the backend is gone, sign() raises SignerError (never a crash, never a bad
    signature); once it is back, signing works again within a bounded time."""
    signer, unplugged = outage
    public = signer.public_key()
    verify(public, signer.algorithm, signer.sign(b"before"), b"before")
    with unplugged():
        with pytest.raises(SignerError) as info:
            signer.sign(b"during")
        assert info.value.message
    deadline = time.monotonic() + 15
    while True:
        try:
            signature = signer.sign(b"after")
            break
        except SignerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    verify(public, signer.algorithm, signature, b"after")
