"""The ``gcpkms`` entry of the Signer conformance suite: the real google-cloud-kms client
against the Cloud KMS emulator (tests/fakes/kms.py) on loopback.

One emulator serves the whole session; it is started by the first signer made and
stopped when the interpreter exits. Its keys are the session's test keys
(tests.pki.helpers.key), so no RSA-4096 key is generated again.
"""

from __future__ import annotations

import atexit
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from pathlib import Path

import grpc

from meshca.config import GcpKmsSignerConfig
from meshca.pki.keys import KeyAlgorithm
from meshca.signers.base import Signer
from meshca.signers.gcpkms import GcpKmsSigner
from tests.fakes.kms import FakeKms, PrivateKey
from tests.pki.helpers import key

KEY_RING = "projects/meshca-conformance/locations/global/keyRings/conformance"

# Written out here rather than imported from meshca, so the suite checks the mapping.
KMS_NAMES = {
    "EC_SIGN_P256_SHA256": KeyAlgorithm.EC_P256,
    "EC_SIGN_P384_SHA384": KeyAlgorithm.EC_P384,
    "RSA_SIGN_PKCS1_2048_SHA256": KeyAlgorithm.RSA_2048,
    "RSA_SIGN_PKCS1_3072_SHA256": KeyAlgorithm.RSA_3072,
    "RSA_SIGN_PKCS1_4096_SHA256": KeyAlgorithm.RSA_4096,
}

_lock = threading.Lock()
_emulator: FakeKms | None = None


def _session_key(kms_algorithm: str) -> PrivateKey:
    return key(KMS_NAMES[kms_algorithm])


def emulator() -> FakeKms:
    """The session's emulator, started on first use."""
    global _emulator
    with _lock:
        if _emulator is None:
            _emulator = FakeKms(key_source=_session_key).start()
            atexit.register(_emulator.stop)
        return _emulator


def make(base: Path, algorithm: KeyAlgorithm) -> Signer:
    kms = emulator()
    kms_algorithm = next(name for name, alg in KMS_NAMES.items() if alg is algorithm)
    version = kms.add_key(f"{KEY_RING}/cryptoKeys/{algorithm.value}", kms_algorithm)
    config = GcpKmsSignerConfig(
        key_version=version,
        endpoint=kms.endpoint,
        insecure_endpoint=True,
        timeout=timedelta(seconds=10),
    )
    return GcpKmsSigner.open(config)


def outage(base: Path) -> tuple[Signer, Callable[[], AbstractContextManager[None]]]:
    """A signer with a short deadline, and KMS answering UNAVAILABLE to every call."""
    kms = emulator()
    version = kms.add_key(
        f"{KEY_RING}/cryptoKeys/outage-{secrets.token_hex(4)}", "EC_SIGN_P256_SHA256"
    )
    signer = GcpKmsSigner.open(
        GcpKmsSignerConfig(
            key_version=version,
            endpoint=kms.endpoint,
            insecure_endpoint=True,
            timeout=timedelta(milliseconds=300),
        )
    )

    @contextmanager
    def unavailable() -> Iterator[None]:
        kms.fail_always(grpc.StatusCode.UNAVAILABLE)
        try:
            yield
        finally:
            kms.reset_faults()

    return signer, unavailable
