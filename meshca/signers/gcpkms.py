"""The ``gcpkms`` signer backend: a CA key held by Google Cloud KMS.

The private key never leaves Cloud KMS (an HSM by default). meshca hashes locally and
sends only the digest to ``AsymmetricSign``; the public key is read once, when the
signer opens, and cached. Every answer is checked end to end before it is used, as
Google's data-integrity guidelines for Cloud KMS ask
(https://cloud.google.com/kms/docs/data-integrity-guidelines):

* ``GetPublicKey``: the PEM's CRC32C matches ``pem_crc32c`` and ``name`` is the key
  version asked for;
* ``AsymmetricSign``: the request carries ``digest_crc32c`` and the answer must say
  ``verified_digest_crc32c``, name the key version, and carry a ``signature_crc32c``
  that matches the signature; the signature is then verified against the cached public
  key. Anything else is ``SignerError(reason="kms_integrity")``: an unverified signature
  is never returned.

Signatures come back as X.509 wants them: DER ECDSA, or RSASSA-PKCS1-v1_5 (RFC 8017).
Only the algorithms meshca accepts are used (ECDSA P-256/SHA-256, P-384/SHA-384, RSA
2048/3072/4096 PKCS#1 v1.5 with SHA-256); any other key version is refused at open.

Calls, deadlines, retries and how KMS errors become SignerErrors: ``_gcpkms_client``.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, ClassVar, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from google.cloud import kms_v1

from meshca.config import GcpKmsSignerConfig
from meshca.errors import ConfigError, SignerError
from meshca.pki.keys import KeyAlgorithm, PublicKey, UnsupportedKeyError
from meshca.signers._gcpkms_client import (
    KMS_ALGORITHMS,
    Connection,
    KmsClient,
    KmsService,
    checksum,
    crc32c,
    enum_name,
)

if TYPE_CHECKING:
    from meshca.signers.base import Signer

__all__ = ["DEFAULT_READY_TIMEOUT", "GcpKmsSigner", "KmsClient", "ProtectionLevel"]

ProtectionLevel = Literal["hsm", "software"]
"""Where Cloud KMS keeps a key meshca creates: a Cloud HSM, or software (cheaper, tests)."""

DEFAULT_READY_TIMEOUT = timedelta(minutes=2)
"""How long :meth:`GcpKmsSigner.create_version` waits for a new version to be ENABLED."""

_DEFAULT_TIMEOUT = timedelta(seconds=10)
_KEY_ALGORITHMS = {name: algorithm for algorithm, name in KMS_ALGORITHMS.items()}
_ENABLED = "ENABLED"
_PENDING = "PENDING_GENERATION"
_STATE_HINTS = {
    "DISABLED": "enable it with 'gcloud kms keys versions enable'",
    "PENDING_GENERATION": "wait until Cloud KMS has generated it",
    "PENDING_IMPORT": "wait until the import completes",
    "DESTROY_SCHEDULED": "restore it with 'gcloud kms keys versions restore', or use another",
    "DESTROYED": "it can never sign again; configure another key version",
    "IMPORT_FAILED": "it can never sign; configure another key version",
    "GENERATION_FAILED": "it can never sign; configure another key version",
}


class GcpKmsSigner:
    """A :class:`~meshca.signers.base.Signer` whose key is a Cloud KMS CryptoKeyVersion.

    Thread-safe: the underlying gRPC channel serves concurrent ``sign`` calls.
    """

    backend: ClassVar[str] = "gcpkms"
    __slots__ = ("_algorithm", "_closed", "_kms", "_lock", "_name", "_public")

    def __init__(
        self, kms: KmsService, name: str, algorithm: KeyAlgorithm, public: PublicKey
    ) -> None:
        """Wrap an opened key version; use :meth:`open` or :meth:`create_version`."""
        self._kms = kms
        self._name = name
        self._algorithm = algorithm
        self._public = public
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"GcpKmsSigner(key_version={self._name!r}, algorithm={self._algorithm.value!r})"

    @property
    def key_id(self) -> str:
        """The CryptoKeyVersion resource name."""
        return self._name

    @property
    def algorithm(self) -> KeyAlgorithm:
        return self._algorithm

    def public_key(self) -> PublicKey:
        return self._public

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, config: GcpKmsSignerConfig, *, client: KmsClient | None = None) -> GcpKmsSigner:
        """Open ``config.key_version``: check it is ENABLED and usable, cache its public key.

        ``client`` replaces the ``KeyManagementServiceClient`` built from the config (the
        caller then owns it, and :meth:`close` leaves it open). Raises SignerError with
        ``reason`` ``key_version_not_enabled`` (the state is named), ``key_not_allowed``
        (an algorithm meshca does not accept), ``kms_integrity``, or a KMS status reason.
        """
        connection = Connection(
            endpoint=config.endpoint,
            insecure=config.insecure_endpoint,
            timeout=config.timeout.total_seconds(),
        )
        kms = KmsService.connect(connection, client)
        try:
            return cls._opened(kms, kms.get_version(config.key_version), config.key_version)
        except BaseException:
            kms.close()
            raise

    @classmethod
    def create_version(
        cls,
        crypto_key: str,
        algorithm: KeyAlgorithm,
        *,
        protection_level: ProtectionLevel = "hsm",
        endpoint: str | None = None,
        insecure_endpoint: bool = False,
        timeout: timedelta = _DEFAULT_TIMEOUT,
        ready_timeout: timedelta = DEFAULT_READY_TIMEOUT,
        client: KmsClient | None = None,
    ) -> GcpKmsSigner:
        """Create a new signing key version in Cloud KMS and open it (``admin root create``).

        ``crypto_key`` is ``projects/P/locations/L/keyRings/R/cryptoKeys/K``; the key ring
        must exist. If the CryptoKey does not exist it is created (purpose
        ASYMMETRIC_SIGN, ``algorithm``, ``protection_level``) and its first version made;
        otherwise a new version of the existing key is made, which requires the key to be
        an ASYMMETRIC_SIGN key of the same algorithm and protection level (Cloud KMS
        gives every version its key's template). The new version is polled until ENABLED,
        for at most ``ready_timeout``. Create calls are not retried, so a lost answer
        never makes two versions. The new version's name is the signer's ``key_id``: put
        it in ``signer.key_version``. ``endpoint``, ``insecure_endpoint`` and ``timeout``
        mean what they mean in :class:`~meshca.config.GcpKmsSignerConfig`.
        """
        key_ring, key_id = _split_crypto_key(crypto_key)
        connection = Connection(endpoint, insecure_endpoint, timeout.total_seconds())
        kms = KmsService.connect(connection, client)
        try:
            _ensure_crypto_key(kms, key_ring, key_id, algorithm, protection_level)
            name = kms.create_version(crypto_key).name
            version = _wait_until_enabled(kms, name, ready_timeout.total_seconds())
            return cls._opened(kms, version, name)
        except BaseException:
            kms.close()
            raise

    @classmethod
    def _opened(cls, kms: KmsService, version: kms_v1.CryptoKeyVersion, name: str) -> GcpKmsSigner:
        if version.name != name:
            raise _integrity(f"GetCryptoKeyVersion for {name} answered for {version.name!r}")
        state = enum_name(version.state)
        if state != _ENABLED:
            hint = _STATE_HINTS.get(state, "only ENABLED versions can sign")
            raise SignerError(
                f"Cloud KMS key version {name} is {state}, not ENABLED; {hint}",
                reason="key_version_not_enabled",
            )
        algorithm = _key_algorithm(name, enum_name(version.algorithm))
        answer = kms.get_public_key(name)
        if answer.name != name:
            raise _integrity(f"GetPublicKey for {name} answered for {answer.name!r}")
        pem = answer.pem.encode()
        if checksum(answer.pem_crc32c) != crc32c(pem):
            raise _integrity(f"the public key of {name} does not match its pem_crc32c")
        if enum_name(answer.algorithm) != enum_name(version.algorithm):
            raise _integrity(
                f"GetPublicKey for {name} reports {enum_name(answer.algorithm)} but the "
                f"key version is {enum_name(version.algorithm)}"
            )
        return cls(kms, name, algorithm, _parse_public_key(name, pem, algorithm))

    # -- signing ---------------------------------------------------------------------

    def sign(self, data: bytes) -> bytes:
        """Hash ``data`` locally and have Cloud KMS sign the digest; checked end to end."""
        if self._closed:
            raise SignerError(f"signer for {self._name} is closed", reason="signer_closed")
        digest_algorithm = self._algorithm.hash_algorithm()
        hasher = hashes.Hash(digest_algorithm)
        hasher.update(data)
        digest = hasher.finalize()
        answer = self._kms.sign(
            self._name, kms_v1.Digest({digest_algorithm.name: digest}), crc32c(digest)
        )
        if answer.name != self._name:
            raise _integrity(f"AsymmetricSign for {self._name} answered for {answer.name!r}")
        if not answer.verified_digest_crc32c:
            raise _integrity(
                f"Cloud KMS did not confirm the digest's CRC32C when signing with {self._name}"
            )
        signature = answer.signature
        if checksum(answer.signature_crc32c) != crc32c(signature):
            raise _integrity(f"the signature from {self._name} does not match its signature_crc32c")
        self._verify(signature, digest, digest_algorithm)
        return signature

    def _verify(self, signature: bytes, digest: bytes, algorithm: hashes.HashAlgorithm) -> None:
        try:
            if isinstance(self._public, ec.EllipticCurvePublicKey):
                self._public.verify(signature, digest, ec.ECDSA(Prehashed(algorithm)))
            else:
                self._public.verify(signature, digest, padding.PKCS1v15(), Prehashed(algorithm))
        except InvalidSignature:
            raise _integrity(
                f"the signature from {self._name} does not verify with its public key"
            ) from None

    def close(self) -> None:
        """Close the KMS channel this signer opened (not a caller's ``client``). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._kms.close()


def _integrity(what: str) -> SignerError:
    return SignerError(
        f"Cloud KMS answer failed its integrity check: {what}; the answer was discarded "
        "(retry; if it persists, check the network path to Cloud KMS)",
        reason="kms_integrity",
    )


def _key_algorithm(name: str, kms_algorithm: str) -> KeyAlgorithm:
    try:
        return _KEY_ALGORITHMS[kms_algorithm]
    except KeyError:
        raise SignerError(
            f"Cloud KMS key version {name} is {kms_algorithm}; allowed: "
            f"{', '.join(KMS_ALGORITHMS.values())}",
            reason="key_not_allowed",
        ) from None


def _parse_public_key(name: str, pem: bytes, algorithm: KeyAlgorithm) -> PublicKey:
    try:
        public = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise _integrity(f"GetPublicKey for {name} did not return a PEM public key") from None
    if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise _integrity(f"the public key of {name} is {type(public).__name__}")
    try:
        found = KeyAlgorithm.of(public)
    except UnsupportedKeyError as exc:
        raise _integrity(f"the public key of {name}: {exc}") from None
    if found is not algorithm:
        raise _integrity(f"the public key of {name} is {found}, not {algorithm}")
    return public


def _split_crypto_key(crypto_key: str) -> tuple[str, str]:
    parts = crypto_key.split("/")
    if (
        len(parts) != 8
        or parts[0::2] != ["projects", "locations", "keyRings", "cryptoKeys"]
        or not all(parts[1::2])
    ):
        raise ConfigError(
            f"crypto key {crypto_key!r} must be projects/P/locations/L/keyRings/R/cryptoKeys/K"
        )
    return "/".join(parts[:6]), parts[7]


def _ensure_crypto_key(
    kms: KmsService,
    key_ring: str,
    key_id: str,
    algorithm: KeyAlgorithm,
    protection_level: ProtectionLevel,
) -> None:
    """Create the CryptoKey if missing; otherwise check it makes the versions asked for."""
    name = f"{key_ring}/cryptoKeys/{key_id}"
    try:
        key = kms.get_key(name)
    except SignerError as exc:
        if exc.reason != "kms_not_found":
            raise
        template = kms_v1.CryptoKeyVersionTemplate(
            algorithm=KMS_ALGORITHMS[algorithm], protection_level=protection_level.upper()
        )
        wanted = kms_v1.CryptoKey(purpose="ASYMMETRIC_SIGN", version_template=template)
        try:
            kms.create_key(key_ring, key_id, wanted)
            return
        except SignerError as create_exc:
            if create_exc.reason != "kms_already_exists":  # another admin won the race
                raise
        key = kms.get_key(name)
    found = (
        enum_name(key.purpose),
        enum_name(key.version_template.algorithm),
        enum_name(key.version_template.protection_level),
    )
    expected = ("ASYMMETRIC_SIGN", KMS_ALGORITHMS[algorithm], protection_level.upper())
    if found != expected:
        raise SignerError(
            f"Cloud KMS key {name} makes {' '.join(found)} versions but {' '.join(expected)} "
            "was asked for; ask for what the key makes, or name another key",
            reason="kms_key_mismatch",
        )


def _wait_until_enabled(
    kms: KmsService, name: str, ready_timeout: float
) -> kms_v1.CryptoKeyVersion:
    """Poll a new version until Cloud KMS has generated its key."""
    deadline = time.monotonic() + ready_timeout
    delay = 0.05
    while True:
        version = kms.get_version(name)
        state = enum_name(version.state)
        if state == _ENABLED:
            return version
        if state != _PENDING:
            raise SignerError(
                f"Cloud KMS key version {name} became {state} instead of ENABLED",
                reason="key_generation_failed",
            )
        if time.monotonic() + delay > deadline:
            raise SignerError(
                f"Cloud KMS key version {name} is still {_PENDING} after {ready_timeout:g}s; "
                "open it once it is ENABLED ('gcloud kms keys versions describe')",
                reason="key_version_not_ready",
            )
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


if TYPE_CHECKING:
    _satisfies_protocol: type[Signer] = GcpKmsSigner
