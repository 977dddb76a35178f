"""The Cloud KMS backend: the real google-cloud-kms client against the emulator.

How a signer opens, creates keys, checks every answer, retries and fails. What every
Signer must do is also run against this backend by tests/conformance.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509.oid import NameOID
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)

from meshca.config import GcpKmsSignerConfig
from meshca.errors import ConfigError, SignerError
from meshca.pki import profile
from meshca.pki.keys import KeyAlgorithm, PublicKey
from meshca.signers.base import Signer, as_private_key
from meshca.signers.gcpkms import GcpKmsSigner
from tests.fakes.kms import FakeKms
from tests.pki.helpers import needs_openssl, openssl_verify

RING = "projects/p/locations/global/keyRings/meshca"
KMS_NAME = {  # written out, not imported: the tests check meshca's own mapping
    KeyAlgorithm.EC_P256: "EC_SIGN_P256_SHA256",
    KeyAlgorithm.EC_P384: "EC_SIGN_P384_SHA384",
    KeyAlgorithm.RSA_2048: "RSA_SIGN_PKCS1_2048_SHA256",
    KeyAlgorithm.RSA_3072: "RSA_SIGN_PKCS1_3072_SHA256",
    KeyAlgorithm.RSA_4096: "RSA_SIGN_PKCS1_4096_SHA256",
}
ALGORITHMS = list(KeyAlgorithm)


@pytest.fixture(scope="module")
def kms() -> Iterator[FakeKms]:
    with FakeKms() as emulator:
        yield emulator


@pytest.fixture(scope="module")
def versions(kms: FakeKms) -> dict[KeyAlgorithm, str]:
    """One ENABLED key version per algorithm (RSA-4096 generation is slow: once)."""
    return {
        alg: kms.add_key(f"{RING}/cryptoKeys/root-{alg.value}", KMS_NAME[alg]) for alg in ALGORITHMS
    }


@pytest.fixture(autouse=True)
def healthy(kms: FakeKms) -> Iterator[None]:
    """Each test starts with a working emulator and zeroed counters."""
    kms.reset_faults()
    kms.calls.clear()
    yield
    kms.reset_faults()


def config(kms: FakeKms, version: str, *, timeout: float = 5.0) -> GcpKmsSignerConfig:
    return GcpKmsSignerConfig(
        key_version=version,
        endpoint=kms.endpoint,
        insecure_endpoint=True,
        timeout=timedelta(seconds=timeout),
    )


def opened(kms: FakeKms, version: str, *, timeout: float = 5.0) -> GcpKmsSigner:
    return GcpKmsSigner.open(config(kms, version, timeout=timeout))


@pytest.fixture
def p256(kms: FakeKms, versions: dict[KeyAlgorithm, str]) -> Iterator[GcpKmsSigner]:
    signer = opened(kms, versions[KeyAlgorithm.EC_P256], timeout=1.0)
    kms.calls.clear()
    yield signer
    signer.close()


def verify(public: PublicKey, algorithm: KeyAlgorithm, signature: bytes, data: bytes) -> None:
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, data, ec.ECDSA(algorithm.hash_algorithm()))
    else:
        public.verify(signature, data, padding.PKCS1v15(), algorithm.hash_algorithm())


def spki(public: PublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- open and sign ---------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=[a.value for a in ALGORITHMS])
def test_open_sign_and_verify_every_algorithm(
    kms: FakeKms, versions: dict[KeyAlgorithm, str], algorithm: KeyAlgorithm
) -> None:
    version = versions[algorithm]
    signer = opened(kms, version)
    try:
        assert isinstance(signer, Signer)
        assert signer.backend == "gcpkms"
        assert signer.key_id == version
        assert signer.algorithm is algorithm
        assert spki(signer.public_key()) == spki(kms.private_key(version).public_key())
        for data in (b"tbsCertificate", b"", os.urandom(4096)):
            verify(signer.public_key(), algorithm, signer.sign(data), data)
    finally:
        signer.close()
    # The public key is read once and cached; each signature is one AsymmetricSign.
    assert kms.calls == {"GetCryptoKeyVersion": 1, "GetPublicKey": 1, "AsymmetricSign": 3}


@needs_openssl
@pytest.mark.parametrize(
    "algorithm", [KeyAlgorithm.EC_P384, KeyAlgorithm.RSA_3072], ids=["ec-p384", "rsa-3072"]
)
def test_certificate_signed_in_kms_verifies_with_openssl(
    kms: FakeKms, versions: dict[KeyAlgorithm, str], algorithm: KeyAlgorithm, tmp_path: Path
) -> None:
    signer = opened(kms, versions[algorithm])
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshca kms root")])
    ski = x509.SubjectKeyIdentifier.from_public_key(signer.public_key())
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.public_key())
        .serial_number(profile.new_serial())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(as_private_key(signer), signer.algorithm.hash_algorithm())
    )
    signer.close()
    result = openssl_verify(tmp_path, root, root, purpose=None, extra=["-check_ss_sig"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert kms.calls["AsymmetricSign"] == 1


def test_concurrent_signing_from_threads(p256: GcpKmsSigner, kms: FakeKms) -> None:
    messages = [os.urandom(32) for _ in range(64)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        signatures = list(pool.map(p256.sign, messages))
    for data, signature in zip(messages, signatures, strict=True):
        verify(p256.public_key(), p256.algorithm, signature, data)
    assert kms.calls["AsymmetricSign"] == 64


# -- create_version ----------------------------------------------------------------------


def test_create_version_creates_a_missing_key_in_an_hsm(kms: FakeKms) -> None:
    kms.add_key_ring(RING)
    crypto_key = f"{RING}/cryptoKeys/new-root"
    kms.generation_polls = 3
    try:
        signer = GcpKmsSigner.create_version(
            crypto_key, KeyAlgorithm.EC_P384, endpoint=kms.endpoint, insecure_endpoint=True
        )
    finally:
        kms.generation_polls = 1
    assert signer.key_id == f"{crypto_key}/cryptoKeyVersions/1"
    assert signer.algorithm is KeyAlgorithm.EC_P384
    assert kms.key_template(crypto_key) == ("EC_SIGN_P384_SHA384", "HSM")
    assert kms.calls["CreateCryptoKey"] == 1
    assert kms.calls["CreateCryptoKeyVersion"] == 1
    assert kms.calls["GetCryptoKeyVersion"] >= 4  # polled through PENDING_GENERATION
    verify(signer.public_key(), signer.algorithm, signer.sign(b"root"), b"root")
    signer.close()


def test_create_version_adds_a_version_to_an_existing_key(kms: FakeKms) -> None:
    crypto_key = f"{RING}/cryptoKeys/rotated-root"
    first = kms.add_key(crypto_key, "EC_SIGN_P256_SHA256", protection_level="SOFTWARE")
    signer = GcpKmsSigner.create_version(
        crypto_key,
        KeyAlgorithm.EC_P256,
        protection_level="software",
        endpoint=kms.endpoint,
        insecure_endpoint=True,
    )
    assert signer.key_id == f"{crypto_key}/cryptoKeyVersions/2"
    assert spki(signer.public_key()) != spki(kms.private_key(first).public_key())
    assert kms.calls["CreateCryptoKey"] == 0
    assert kms.calls["CreateCryptoKeyVersion"] == 1
    signer.close()


@pytest.mark.parametrize(
    ("algorithm", "protection", "found"),
    [
        (KeyAlgorithm.EC_P384, "hsm", "EC_SIGN_P256_SHA256 HSM"),
        (KeyAlgorithm.EC_P256, "software", "EC_SIGN_P256_SHA256 HSM"),
    ],
    ids=["other-algorithm", "other-protection-level"],
)
def test_create_version_refuses_a_key_that_makes_other_versions(
    kms: FakeKms, algorithm: KeyAlgorithm, protection: str, found: str
) -> None:
    crypto_key = f"{RING}/cryptoKeys/p256-hsm-{protection}-{algorithm.value}"
    kms.add_key(crypto_key, "EC_SIGN_P256_SHA256", protection_level="HSM")
    with pytest.raises(SignerError) as info:
        GcpKmsSigner.create_version(
            crypto_key,
            algorithm,
            protection_level=protection,  # type: ignore[arg-type]
            endpoint=kms.endpoint,
            insecure_endpoint=True,
        )
    assert info.value.reason == "kms_key_mismatch"
    assert found in info.value.message
    assert kms.calls["CreateCryptoKeyVersion"] == 0


def test_create_version_needs_the_key_ring(kms: FakeKms) -> None:
    crypto_key = "projects/p/locations/global/keyRings/missing/cryptoKeys/root"
    with pytest.raises(SignerError) as info:
        GcpKmsSigner.create_version(
            crypto_key, KeyAlgorithm.EC_P256, endpoint=kms.endpoint, insecure_endpoint=True
        )
    assert info.value.reason == "kms_not_found"
    assert "keyRings/missing" in info.value.message
    assert not kms.has_key(crypto_key)


def test_create_version_gives_up_waiting_for_generation(kms: FakeKms) -> None:
    kms.add_key_ring(RING)
    kms.generation_polls = 10_000
    try:
        with pytest.raises(SignerError) as info:
            GcpKmsSigner.create_version(
                f"{RING}/cryptoKeys/slow-hsm",
                KeyAlgorithm.EC_P256,
                endpoint=kms.endpoint,
                insecure_endpoint=True,
                ready_timeout=timedelta(seconds=0.5),
            )
    finally:
        kms.generation_polls = 1
    assert info.value.reason == "key_version_not_ready"
    assert "PENDING_GENERATION" in info.value.message


@pytest.mark.parametrize(
    "crypto_key",
    [
        "projects/p/locations/global/keyRings/r",
        "projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
        "projects//locations/global/keyRings/r/cryptoKeys/k",
        "keys/k",
    ],
)
def test_create_version_refuses_a_name_that_is_not_a_crypto_key(crypto_key: str) -> None:
    with pytest.raises(ConfigError, match="must be projects/P/locations/L/keyRings/R/cryptoKeys/K"):
        GcpKmsSigner.create_version(crypto_key, KeyAlgorithm.EC_P256, endpoint="127.0.0.1:1")


# -- retries ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_transient_errors_are_retried(
    p256: GcpKmsSigner, kms: FakeKms, code: grpc.StatusCode
) -> None:
    kms.fail_next(2, code, method="AsymmetricSign")
    verify(p256.public_key(), p256.algorithm, p256.sign(b"retried"), b"retried")
    assert kms.calls["AsymmetricSign"] == 3


def test_open_retries_transient_errors(kms: FakeKms, versions: dict[KeyAlgorithm, str]) -> None:
    kms.fail_next(1, method="GetCryptoKeyVersion")
    kms.fail_next(1, method="GetPublicKey")
    opened(kms, versions[KeyAlgorithm.EC_P256]).close()
    assert kms.calls == {"GetCryptoKeyVersion": 2, "GetPublicKey": 2}


def test_kms_unavailable_for_good_fails_within_the_retry_budget(
    kms: FakeKms, versions: dict[KeyAlgorithm, str]
) -> None:
    signer = opened(kms, versions[KeyAlgorithm.EC_P256], timeout=0.4)
    kms.calls.clear()
    kms.fail_always(grpc.StatusCode.UNAVAILABLE)
    started = time.monotonic()
    with pytest.raises(SignerError) as info:
        signer.sign(b"never")
    assert time.monotonic() - started < 10  # budget 3 x 0.4 s; the test only checks it ends
    signer.close()
    assert info.value.reason == "signer_unavailable"
    assert "UNAVAILABLE" in info.value.message
    assert kms.endpoint in info.value.message
    assert kms.calls["AsymmetricSign"] > 1


def test_a_slow_kms_hits_the_per_call_deadline(
    kms: FakeKms, versions: dict[KeyAlgorithm, str]
) -> None:
    signer = opened(kms, versions[KeyAlgorithm.EC_P256], timeout=0.4)
    kms.latency = 1.0  # longer than the 0.4 s per-call timeout
    with pytest.raises(SignerError) as info:
        signer.sign(b"slow")
    signer.close()
    assert info.value.reason == "signer_unavailable"
    assert "DEADLINE_EXCEEDED" in info.value.message


# -- integrity -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ("corrupt_signature_crc32c", "does not match its signature_crc32c"),
        ("unverified_digest_crc32c", "did not confirm the digest's CRC32C"),
        ("corrupt_signature", "does not verify with its public key"),
        ("wrong_name", "answered for"),
    ],
)
def test_an_answer_that_fails_its_integrity_check_is_never_returned(
    p256: GcpKmsSigner, kms: FakeKms, fault: str, said: str
) -> None:
    setattr(kms.faults, fault, True)
    with pytest.raises(SignerError) as info:
        p256.sign(b"integrity")
    assert info.value.reason == "kms_integrity"
    assert said in info.value.message


@pytest.mark.parametrize("fault", ["corrupt_pem_crc32c", "wrong_name"])
def test_open_refuses_a_public_key_that_fails_its_integrity_check(
    kms: FakeKms, versions: dict[KeyAlgorithm, str], fault: str
) -> None:
    setattr(kms.faults, fault, True)
    with pytest.raises(SignerError) as info:
        opened(kms, versions[KeyAlgorithm.EC_P256])
    assert info.value.reason == "kms_integrity"


# -- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state", ["DISABLED", "DESTROYED", "DESTROY_SCHEDULED", "PENDING_GENERATION"]
)
def test_open_refuses_a_version_that_is_not_enabled(kms: FakeKms, state: str) -> None:
    version = kms.add_key(f"{RING}/cryptoKeys/state-{state.lower()}")
    kms.set_state(version, state)
    with pytest.raises(SignerError) as info:
        opened(kms, version)
    assert info.value.reason == "key_version_not_enabled"
    assert f"{version} is {state}, not ENABLED" in info.value.message
    assert kms.calls["GetPublicKey"] == 0


def test_a_version_disabled_after_open_stops_signing(kms: FakeKms) -> None:
    version = kms.add_key(f"{RING}/cryptoKeys/disabled-later")
    signer = opened(kms, version)
    kms.set_state(version, "DISABLED")
    with pytest.raises(SignerError) as info:
        signer.sign(b"late")
    assert info.value.reason == "kms_failed_precondition"
    assert "DISABLED" in info.value.message
    signer.close()


@pytest.mark.parametrize("kms_algorithm", ["EC_SIGN_SECP256K1_SHA256", "RSA_SIGN_PSS_2048_SHA256"])
def test_open_refuses_algorithms_meshca_does_not_accept(kms: FakeKms, kms_algorithm: str) -> None:
    version = kms.add_key(f"{RING}/cryptoKeys/{kms_algorithm.lower()}", kms_algorithm)
    with pytest.raises(SignerError) as info:
        opened(kms, version)
    assert info.value.reason == "key_not_allowed"
    assert kms_algorithm in info.value.message
    assert "allowed: EC_SIGN_P256_SHA256" in info.value.message


def test_permission_denied_on_sign_is_reported_at_once(p256: GcpKmsSigner, kms: FakeKms) -> None:
    kms.fail_always(grpc.StatusCode.PERMISSION_DENIED, method="AsymmetricSign")
    with pytest.raises(SignerError) as info:
        p256.sign(b"denied")
    assert info.value.reason == "kms_permission_denied"
    assert "cloudkms.cryptoKeyVersions.useToSign" in info.value.message
    assert "roles/cloudkms.signerVerifier" in info.value.message
    assert kms.calls["AsymmetricSign"] == 1  # not retried


def test_permission_denied_on_open(kms: FakeKms, versions: dict[KeyAlgorithm, str]) -> None:
    kms.fail_always(grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(SignerError) as info:
        opened(kms, versions[KeyAlgorithm.EC_P256])
    assert info.value.reason == "kms_permission_denied"
    assert "GetCryptoKeyVersion" in info.value.message


def test_a_missing_version_is_named(kms: FakeKms) -> None:
    version = f"{RING}/cryptoKeys/nothing/cryptoKeyVersions/7"
    with pytest.raises(SignerError) as info:
        opened(kms, version)
    assert info.value.reason == "kms_not_found"
    assert version in info.value.message


def test_insecure_endpoint_needs_an_endpoint(versions: dict[KeyAlgorithm, str]) -> None:
    with pytest.raises(ConfigError, match=r"needs signer\.endpoint"):
        GcpKmsSigner.open(
            GcpKmsSignerConfig(key_version=versions[KeyAlgorithm.EC_P256], insecure_endpoint=True)
        )


def test_no_application_default_credentials_is_explained(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, versions: dict[KeyAlgorithm, str]
) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud ADC file
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # not on GCE: no metadata server probe
    with pytest.raises(SignerError) as info:
        GcpKmsSigner.open(GcpKmsSignerConfig(key_version=versions[KeyAlgorithm.EC_P256]))
    assert info.value.reason == "kms_unauthenticated"
    assert "Application Default Credentials" in info.value.message


# -- lifecycle -------------------------------------------------------------------------


def test_a_closed_signer_refuses_to_sign(kms: FakeKms, versions: dict[KeyAlgorithm, str]) -> None:
    signer = opened(kms, versions[KeyAlgorithm.EC_P256])
    signer.close()
    signer.close()  # idempotent
    with pytest.raises(SignerError) as info:
        signer.sign(b"after close")
    assert info.value.reason == "signer_closed"
    assert kms.calls["AsymmetricSign"] == 0


def test_a_callers_client_is_used_and_left_open(
    kms: FakeKms, versions: dict[KeyAlgorithm, str]
) -> None:
    channel = grpc.insecure_channel(kms.endpoint)
    client = kms_v1.KeyManagementServiceClient(
        transport=KeyManagementServiceGrpcTransport(channel=channel)
    )
    version = versions[KeyAlgorithm.EC_P256]
    signer = GcpKmsSigner.open(config(kms, version), client=client)
    signer.close()
    assert client.get_crypto_key_version(name=version).name == version  # still open
    channel.close()


def test_repr_names_the_key_version_only(p256: GcpKmsSigner) -> None:
    assert repr(p256) == (f"GcpKmsSigner(key_version={p256.key_id!r}, algorithm='ec-p256')")
    assert not hasattr(p256, "__dict__")


async def test_emulator_and_signer_from_async_code() -> None:
    """An async test starts its own emulator and signs off the event loop."""
    async with FakeKms() as emulator:
        version = emulator.add_key(f"{RING}/cryptoKeys/async")
        signer = await asyncio.to_thread(opened, emulator, version)
        signatures = await asyncio.gather(
            *(asyncio.to_thread(signer.sign, bytes([i])) for i in range(4))
        )
        for i, signature in enumerate(signatures):
            verify(signer.public_key(), signer.algorithm, signature, bytes([i]))
        signer.close()
        assert emulator.calls["AsymmetricSign"] == 4
