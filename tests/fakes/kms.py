"""A Cloud KMS emulator: ``google.cloud.kms.v1.KeyManagementService`` over real gRPC.

It serves, on a loopback port the OS picks, the RPCs meshca's ``gcpkms`` signer makes,
with the real request and response messages of google-cloud-kms, so the real
``KeyManagementServiceClient`` talks to it unchanged (plaintext channel, no
credentials):

* ``GetCryptoKey``, ``CreateCryptoKey`` (ASYMMETRIC_SIGN keys only; honours
  ``skip_initial_version_creation``), ``CreateCryptoKeyVersion``;
* ``GetCryptoKeyVersion`` (a created version stays PENDING_GENERATION for
  ``generation_polls`` reads, then is ENABLED);
* ``GetPublicKey``: PEM, ``pem_crc32c``, ``name``, ``algorithm``;
* ``AsymmetricSign``: checks the digest is the algorithm's and ``digest_crc32c``, sets
  ``verified_digest_crc32c``, ``signature_crc32c`` and ``name``. ECDSA signatures are DER,
  RSA ones PKCS#1 v1.5 (or PSS for the PSS algorithms), as Cloud KMS returns them.

There is no protobuf servicer class in google-cloud-kms, so the service is registered
with ``grpc.method_handlers_generic_handler`` under the method paths the client's gRPC
transport calls, (de)serialising with the proto-plus classes' ``serialize`` and
``deserialize``. Keys are ``cryptography`` keys, one per CryptoKeyVersion.

Switches let tests break it (``fail_next``, ``fail_always``, ``faults``, ``set_state``,
``latency``) and ``calls`` counts every RPC by method name, failed ones included::

    with FakeKms() as kms:
        version = kms.add_key("projects/p/locations/global/keyRings/r/cryptoKeys/k")
        config = GcpKmsSignerConfig(
            key_version=version, endpoint=kms.endpoint, insecure_endpoint=True
        )
        ...
        assert kms.calls["AsymmetricSign"] == 1
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Self, TypeVar

import google_crc32c
import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from google.cloud import kms_v1

SERVICE = "google.cloud.kms.v1.KeyManagementService"
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
KeySource = Callable[[str], PrivateKey]
"""Makes the private key of a new version, given its KMS algorithm name."""

_Request = TypeVar("_Request")
_KEY_ID = re.compile(r"^[a-zA-Z0-9_-]{1,63}$")


@dataclass(frozen=True)
class _Scheme:
    generate: Callable[[], PrivateKey]
    digest: hashes.SHA256 | hashes.SHA384 | hashes.SHA512
    pss: bool = False


def _ec(curve: ec.EllipticCurve) -> Callable[[], PrivateKey]:
    return lambda: ec.generate_private_key(curve)


def _rsa(bits: int) -> Callable[[], PrivateKey]:
    return lambda: rsa.generate_private_key(public_exponent=65537, key_size=bits)


SCHEMES: dict[str, _Scheme] = {
    "EC_SIGN_P256_SHA256": _Scheme(_ec(ec.SECP256R1()), hashes.SHA256()),
    "EC_SIGN_P384_SHA384": _Scheme(_ec(ec.SECP384R1()), hashes.SHA384()),
    "EC_SIGN_SECP256K1_SHA256": _Scheme(_ec(ec.SECP256K1()), hashes.SHA256()),
    "RSA_SIGN_PKCS1_2048_SHA256": _Scheme(_rsa(2048), hashes.SHA256()),
    "RSA_SIGN_PKCS1_3072_SHA256": _Scheme(_rsa(3072), hashes.SHA256()),
    "RSA_SIGN_PKCS1_4096_SHA256": _Scheme(_rsa(4096), hashes.SHA256()),
    "RSA_SIGN_PKCS1_4096_SHA512": _Scheme(_rsa(4096), hashes.SHA512()),
    "RSA_SIGN_PSS_2048_SHA256": _Scheme(_rsa(2048), hashes.SHA256(), pss=True),
}
"""The signing algorithms the emulator can hold, with how Cloud KMS signs for each."""


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


@dataclass
class Faults:
    """Answers that are wrong in the ways a network or a broken service can make them."""

    corrupt_signature_crc32c: bool = False
    """``signature_crc32c`` does not match the signature."""
    unverified_digest_crc32c: bool = False
    """``verified_digest_crc32c`` is false (KMS did not check the digest's CRC32C)."""
    corrupt_signature: bool = False
    """The signature is damaged but its CRC32C matches the damaged bytes."""
    wrong_name: bool = False
    """Sign and public-key answers name another key version."""
    corrupt_pem_crc32c: bool = False
    """``pem_crc32c`` does not match the PEM."""


@dataclass
class _Failure:
    code: grpc.StatusCode
    method: str | None
    remaining: int | None  # None: until reset_faults()


@dataclass
class _Version:
    name: str
    algorithm: str
    protection_level: str
    key: PrivateKey = field(repr=False)
    state: str = "ENABLED"
    pending_polls: int = 0
    created: datetime = field(default_factory=lambda: datetime.now(UTC))

    def message(self) -> kms_v1.CryptoKeyVersion:
        return kms_v1.CryptoKeyVersion(
            name=self.name,
            state=self.state,
            algorithm=self.algorithm,
            protection_level=self.protection_level,
            create_time=self.created,
        )


@dataclass
class _Key:
    name: str
    algorithm: str
    protection_level: str
    next_version: int = 1
    created: datetime = field(default_factory=lambda: datetime.now(UTC))

    def message(self) -> kms_v1.CryptoKey:
        return kms_v1.CryptoKey(
            name=self.name,
            purpose="ASYMMETRIC_SIGN",
            create_time=self.created,
            version_template=kms_v1.CryptoKeyVersionTemplate(
                algorithm=self.algorithm, protection_level=self.protection_level
            ),
        )


class _RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class FakeKms:
    """The emulator. ``start()``/``stop()`` or a (sync or async) ``with`` block."""

    def __init__(self, *, key_source: KeySource | None = None, generation_polls: int = 1) -> None:
        self._key_source = key_source or (lambda algorithm: SCHEMES[algorithm].generate())
        self.generation_polls = generation_polls
        """GetCryptoKeyVersion reads that see a newly created version PENDING_GENERATION."""
        self.latency = 0.0
        """Seconds every RPC waits before answering (beyond a short client deadline)."""
        self.faults = Faults()
        self.calls: Counter[str] = Counter()
        """RPCs received, by method name (``"AsymmetricSign"``), failed ones included."""
        self._lock = threading.RLock()
        self._failures: list[_Failure] = []
        self._key_rings: set[str] = set()
        self._keys: dict[str, _Key] = {}
        self._versions: dict[str, _Version] = {}
        self._server: grpc.Server | None = None
        self._port = 0

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        server = grpc.server(ThreadPoolExecutor(max_workers=16, thread_name_prefix="fake-kms"))
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, self._handlers()),)
        )
        self._port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, for ``GcpKmsSignerConfig.endpoint``."""
        assert self._server is not None, "FakeKms is not started"
        return f"127.0.0.1:{self._port}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- state set up directly by tests ------------------------------------------------

    def add_key_ring(self, name: str) -> None:
        """``projects/P/locations/L/keyRings/R``: CreateCryptoKey needs its key ring."""
        with self._lock:
            self._key_rings.add(name)

    def add_key(
        self,
        crypto_key: str,
        algorithm: str = "EC_SIGN_P256_SHA256",
        *,
        protection_level: str = "HSM",
    ) -> str:
        """Create a key (and its key ring) with one ENABLED version; return the version name."""
        with self._lock:
            self._key_rings.add(crypto_key.rsplit("/cryptoKeys/", 1)[0])
            self._keys[crypto_key] = _Key(crypto_key, algorithm, protection_level)
            return self.add_version(crypto_key)

    def add_version(self, crypto_key: str, *, state: str = "ENABLED") -> str:
        """Add a version (of the key's algorithm) in ``state``; return its name."""
        with self._lock:
            key = self._keys[crypto_key]
            name = f"{crypto_key}/cryptoKeyVersions/{key.next_version}"
            key.next_version += 1
            self._versions[name] = _Version(
                name, key.algorithm, key.protection_level, self._key_source(key.algorithm), state
            )
            return name

    def set_state(self, version: str, state: str) -> None:
        """Set a version's state: ENABLED, DISABLED, DESTROYED, PENDING_GENERATION, ..."""
        with self._lock:
            self._versions[version].state = state
            self._versions[version].pending_polls = 0

    def private_key(self, version: str) -> PrivateKey:
        with self._lock:
            return self._versions[version].key

    def has_key(self, crypto_key: str) -> bool:
        with self._lock:
            return crypto_key in self._keys

    def key_template(self, crypto_key: str) -> tuple[str, str]:
        """(algorithm, protection level) of a key's versions."""
        with self._lock:
            key = self._keys[crypto_key]
            return key.algorithm, key.protection_level

    # -- fault injection ---------------------------------------------------------------

    def fail_next(
        self,
        count: int = 1,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        *,
        method: str | None = None,
    ) -> None:
        """The next ``count`` calls (of ``method``, or of any method) fail with ``code``."""
        with self._lock:
            self._failures.append(_Failure(code, method, count))

    def fail_always(
        self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, *, method: str | None = None
    ) -> None:
        """Every call (of ``method``, or of any method) fails with ``code`` until reset."""
        with self._lock:
            self._failures.append(_Failure(code, method, None))

    def reset_faults(self) -> None:
        """Answer correctly again: no failures, no faults, no latency. Counters stay."""
        with self._lock:
            self._failures.clear()
            self.faults = Faults()
            self.latency = 0.0

    # -- the service -------------------------------------------------------------------

    def _handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return dict(
            [
                self._unary("GetCryptoKey", self._get_crypto_key, kms_v1.GetCryptoKeyRequest),
                self._unary(
                    "CreateCryptoKey", self._create_crypto_key, kms_v1.CreateCryptoKeyRequest
                ),
                self._unary(
                    "CreateCryptoKeyVersion",
                    self._create_crypto_key_version,
                    kms_v1.CreateCryptoKeyVersionRequest,
                ),
                self._unary(
                    "GetCryptoKeyVersion",
                    self._get_crypto_key_version,
                    kms_v1.GetCryptoKeyVersionRequest,
                ),
                self._unary("GetPublicKey", self._get_public_key, kms_v1.GetPublicKeyRequest),
                self._unary("AsymmetricSign", self._asymmetric_sign, kms_v1.AsymmetricSignRequest),
            ]
        )

    def _unary(
        self,
        method: str,
        handler: Callable[[_Request], object],
        request_type: type[_Request],
    ) -> tuple[str, grpc.RpcMethodHandler]:
        """One RPC: count it, apply latency and injected failures, then answer under the lock."""

        def serve(request: _Request, context: grpc.ServicerContext) -> object:
            with self._lock:
                self.calls[method] += 1
                failure = self._take_failure(method)
                latency = self.latency
            if latency:
                time.sleep(latency)
            try:
                if failure is not None:
                    raise _RpcError(failure, _failure_detail(failure, method, request))
                with self._lock:
                    return handler(request)
            except _RpcError as error:
                context.abort(error.code, error.detail)
                raise  # context.abort always raises

        return method, grpc.unary_unary_rpc_method_handler(
            serve,
            request_deserializer=request_type.deserialize,  # type: ignore[attr-defined]
            response_serializer=_to_wire,
        )

    def _take_failure(self, method: str) -> grpc.StatusCode | None:
        for failure in self._failures:
            if failure.method in (None, method):
                if failure.remaining is not None:
                    failure.remaining -= 1
                    if failure.remaining == 0:
                        self._failures.remove(failure)
                return failure.code
        return None

    def _version(self, name: str) -> _Version:
        version = self._versions.get(name)
        if version is None:
            raise _RpcError(grpc.StatusCode.NOT_FOUND, f"CryptoKeyVersion {name} not found.")
        return version

    def _enabled(self, name: str) -> _Version:
        version = self._version(name)
        if version.state != "ENABLED":
            raise _RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{name} is not enabled, current state is: {version.state}.",
            )
        return version

    def _get_crypto_key(self, request: kms_v1.GetCryptoKeyRequest) -> kms_v1.CryptoKey:
        key = self._keys.get(request.name)
        if key is None:
            raise _RpcError(grpc.StatusCode.NOT_FOUND, f"CryptoKey {request.name} not found.")
        return key.message()

    def _create_crypto_key(self, request: kms_v1.CreateCryptoKeyRequest) -> kms_v1.CryptoKey:
        if request.parent not in self._key_rings:
            raise _RpcError(grpc.StatusCode.NOT_FOUND, f"KeyRing {request.parent} not found.")
        if not _KEY_ID.match(request.crypto_key_id):
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"crypto_key_id {request.crypto_key_id!r} must match {_KEY_ID.pattern}",
            )
        name = f"{request.parent}/cryptoKeys/{request.crypto_key_id}"
        if name in self._keys:
            raise _RpcError(grpc.StatusCode.ALREADY_EXISTS, f"CryptoKey {name} already exists.")
        wanted = request.crypto_key
        if wanted.purpose.name != "ASYMMETRIC_SIGN":
            raise _RpcError(grpc.StatusCode.UNIMPLEMENTED, "the emulator holds signing keys only")
        algorithm = wanted.version_template.algorithm.name
        if algorithm not in SCHEMES:
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"algorithm {algorithm} is not valid for purpose ASYMMETRIC_SIGN",
            )
        level = wanted.version_template.protection_level.name
        if level == "PROTECTION_LEVEL_UNSPECIFIED":
            level = "SOFTWARE"
        key = _Key(name, algorithm, level)
        self._keys[name] = key
        if not request.skip_initial_version_creation:
            self._new_version(key)
        return key.message()

    def _create_crypto_key_version(
        self, request: kms_v1.CreateCryptoKeyVersionRequest
    ) -> kms_v1.CryptoKeyVersion:
        key = self._keys.get(request.parent)
        if key is None:
            raise _RpcError(grpc.StatusCode.NOT_FOUND, f"CryptoKey {request.parent} not found.")
        return self._new_version(key).message()

    def _new_version(self, key: _Key) -> _Version:
        name = self.add_version(key.name, state="PENDING_GENERATION")
        version = self._versions[name]
        version.pending_polls = self.generation_polls
        if not version.pending_polls:
            version.state = "ENABLED"
        return version

    def _get_crypto_key_version(
        self, request: kms_v1.GetCryptoKeyVersionRequest
    ) -> kms_v1.CryptoKeyVersion:
        version = self._version(request.name)
        answer = version.message()
        if version.pending_polls:
            version.pending_polls -= 1
            if not version.pending_polls:
                version.state = "ENABLED"
        return answer

    def _get_public_key(self, request: kms_v1.GetPublicKeyRequest) -> kms_v1.PublicKey:
        version = self._enabled(request.name)
        pem = (
            version.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        return kms_v1.PublicKey(
            pem=pem,
            pem_crc32c=crc32c(pem.encode()) ^ (1 if self.faults.corrupt_pem_crc32c else 0),
            algorithm=version.algorithm,
            name=self._answer_name(version.name),
            protection_level=version.protection_level,
        )

    def _asymmetric_sign(
        self, request: kms_v1.AsymmetricSignRequest
    ) -> kms_v1.AsymmetricSignResponse:
        version = self._enabled(request.name)
        scheme = SCHEMES[version.algorithm]
        field_name = kms_v1.Digest.pb(request.digest).WhichOneof("digest")
        if field_name != scheme.digest.name:
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{version.algorithm} needs a {scheme.digest.name} digest, got {field_name}",
            )
        digest: bytes = getattr(request.digest, field_name)
        if len(digest) != scheme.digest.digest_size:
            raise _RpcError(grpc.StatusCode.INVALID_ARGUMENT, "the digest has the wrong length")
        has_crc = kms_v1.AsymmetricSignRequest.pb(request).HasField("digest_crc32c")
        if has_crc and request.digest_crc32c != crc32c(digest):
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "The checksum in field digest_crc32c did not match the data in field digest.",
            )
        signature = _sign(version.key, scheme, digest)
        if self.faults.corrupt_signature:
            signature = signature[:-1] + bytes([signature[-1] ^ 0x01])
        signature_crc = crc32c(signature) ^ (1 if self.faults.corrupt_signature_crc32c else 0)
        return kms_v1.AsymmetricSignResponse(
            signature=signature,
            signature_crc32c=signature_crc,
            verified_digest_crc32c=has_crc and not self.faults.unverified_digest_crc32c,
            name=self._answer_name(version.name),
            protection_level=version.protection_level,
        )

    def _answer_name(self, name: str) -> str:
        if not self.faults.wrong_name:
            return name
        head, number = name.rsplit("/", 1)
        return f"{head}/{int(number) + 100}"


def _to_wire(message: object) -> bytes:
    """Serialise any proto-plus message with its own class."""
    return bytes(type(message).serialize(message))  # type: ignore[attr-defined]


def _sign(key: PrivateKey, scheme: _Scheme, digest: bytes) -> bytes:
    prehashed = Prehashed(scheme.digest)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(digest, ec.ECDSA(prehashed))
    if scheme.pss:
        pss = padding.PSS(mgf=padding.MGF1(scheme.digest), salt_length=scheme.digest.digest_size)
        return key.sign(digest, pss, prehashed)
    return key.sign(digest, padding.PKCS1v15(), prehashed)


def _failure_detail(code: grpc.StatusCode, method: str, request: object) -> str:
    resource = getattr(request, "name", "") or getattr(request, "parent", "")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"Permission denied on resource '{resource}' (or it may not exist)."
    if code == grpc.StatusCode.UNAVAILABLE:
        return "The service is currently unavailable."
    return f"{code.name} injected by FakeKms into {method}."
