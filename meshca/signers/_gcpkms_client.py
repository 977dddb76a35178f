"""Private plumbing of the ``gcpkms`` backend: the Cloud KMS calls, retries and errors.

The signer talks to Cloud KMS only through :class:`KmsClient`, the six RPCs it uses,
which ``google.cloud.kms_v1.KeyManagementServiceClient`` satisfies as it is.
:class:`KmsService` puts every call under the same policy:

* a per-call deadline of ``timeout``;
* reads and signing are retried with jittered exponential backoff on UNAVAILABLE and
  DEADLINE_EXCEEDED (google-api-core's ``Retry``), for at most ``3 * timeout``;
* creating keys is never retried, so a lost answer cannot create two key versions;
* every failure becomes a :class:`~meshca.errors.SignerError` whose ``reason`` names the
  status and whose message says what to check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypedDict

import google_crc32c
import grpc
from google.api_core import exceptions as api_exceptions
from google.api_core import retry as retries
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_exceptions
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)

from meshca.errors import ConfigError, SignerError
from meshca.pki.keys import KeyAlgorithm

DEFAULT_ENDPOINT = "cloudkms.googleapis.com"
RETRY_BUDGET_FACTOR = 3
"""Retries of one call stop once this many per-call timeouts have passed."""

KMS_ALGORITHMS: dict[KeyAlgorithm, str] = {
    KeyAlgorithm.EC_P256: "EC_SIGN_P256_SHA256",
    KeyAlgorithm.EC_P384: "EC_SIGN_P384_SHA384",
    KeyAlgorithm.RSA_2048: "RSA_SIGN_PKCS1_2048_SHA256",
    KeyAlgorithm.RSA_3072: "RSA_SIGN_PKCS1_3072_SHA256",
    KeyAlgorithm.RSA_4096: "RSA_SIGN_PKCS1_4096_SHA256",
}
"""The CryptoKeyVersionAlgorithm for each KeyAlgorithm: the digests and encodings X.509
wants (RFC 5758 ECDSA with SHA-256/384, RFC 4055 RSASSA-PKCS1-v1_5 with SHA-256)."""


class KmsClient(Protocol):
    """The part of ``KeyManagementServiceClient`` meshca uses."""

    def get_crypto_key_version(
        self,
        request: kms_v1.GetCryptoKeyVersionRequest,
        *,
        retry: retries.Retry | None,
        timeout: float,
    ) -> kms_v1.CryptoKeyVersion: ...

    def get_public_key(
        self, request: kms_v1.GetPublicKeyRequest, *, retry: retries.Retry | None, timeout: float
    ) -> kms_v1.PublicKey: ...

    def asymmetric_sign(
        self, request: kms_v1.AsymmetricSignRequest, *, retry: retries.Retry | None, timeout: float
    ) -> kms_v1.AsymmetricSignResponse: ...

    def get_crypto_key(
        self, request: kms_v1.GetCryptoKeyRequest, *, retry: retries.Retry | None, timeout: float
    ) -> kms_v1.CryptoKey: ...

    def create_crypto_key(
        self, request: kms_v1.CreateCryptoKeyRequest, *, retry: retries.Retry | None, timeout: float
    ) -> kms_v1.CryptoKey: ...

    def create_crypto_key_version(
        self,
        request: kms_v1.CreateCryptoKeyVersionRequest,
        *,
        retry: retries.Retry | None,
        timeout: float,
    ) -> kms_v1.CryptoKeyVersion: ...


@dataclass(frozen=True, slots=True)
class Connection:
    """Where Cloud KMS is and how long to wait for it."""

    endpoint: str | None
    insecure: bool
    timeout: float
    """Seconds allowed for one call."""

    @property
    def where(self) -> str:
        return self.endpoint or DEFAULT_ENDPOINT

    @property
    def retry_budget(self) -> float:
        return RETRY_BUDGET_FACTOR * self.timeout

    def retry(self) -> retries.Retry:
        return retries.Retry(
            predicate=retries.if_exception_type(
                api_exceptions.ServiceUnavailable, api_exceptions.DeadlineExceeded
            ),
            initial=min(0.1, self.timeout / 4),
            maximum=min(2.0, self.timeout),
            multiplier=2.0,
            timeout=self.retry_budget,
        )


class _CallPolicy(TypedDict):
    retry: retries.Retry | None
    timeout: float


@dataclass(frozen=True, slots=True)
class _Rpc:
    name: str
    permission: str
    role: str
    retried: bool = True


_GET_VERSION = _Rpc(
    "GetCryptoKeyVersion", "cloudkms.cryptoKeyVersions.get", "roles/cloudkms.viewer"
)
_GET_PUBLIC_KEY = _Rpc(
    "GetPublicKey", "cloudkms.cryptoKeyVersions.viewPublicKey", "roles/cloudkms.signerVerifier"
)
_SIGN = _Rpc(
    "AsymmetricSign", "cloudkms.cryptoKeyVersions.useToSign", "roles/cloudkms.signerVerifier"
)
_GET_KEY = _Rpc("GetCryptoKey", "cloudkms.cryptoKeys.get", "roles/cloudkms.viewer")
_CREATE_KEY = _Rpc(
    "CreateCryptoKey", "cloudkms.cryptoKeys.create", "roles/cloudkms.admin", retried=False
)
_CREATE_VERSION = _Rpc(
    "CreateCryptoKeyVersion", "cloudkms.cryptoKeyVersions.create", "roles/cloudkms.admin", False
)


class KmsService:
    """The Cloud KMS RPCs the signer makes, each with deadline, retries and error mapping."""

    __slots__ = ("_client", "_closer", "connection")

    def __init__(
        self, client: KmsClient, connection: Connection, closer: Callable[[], object] | None
    ) -> None:
        self._client = client
        self._closer = closer
        self.connection = connection

    @classmethod
    def connect(cls, connection: Connection, client: KmsClient | None = None) -> KmsService:
        """Use ``client`` (owned by the caller), or build one that :meth:`close` closes."""
        if client is not None:
            return cls(client, connection, None)
        built = _build_client(connection)
        return cls(built, connection, built.transport.close)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()

    def get_version(self, name: str) -> kms_v1.CryptoKeyVersion:
        request = kms_v1.GetCryptoKeyVersionRequest(name=name)
        with self._errors(_GET_VERSION, name):
            return self._client.get_crypto_key_version(request, **self._policy(_GET_VERSION))

    def get_public_key(self, name: str) -> kms_v1.PublicKey:
        request = kms_v1.GetPublicKeyRequest(name=name)
        with self._errors(_GET_PUBLIC_KEY, name):
            return self._client.get_public_key(request, **self._policy(_GET_PUBLIC_KEY))

    def sign(
        self, name: str, digest: kms_v1.Digest, digest_crc32c: int
    ) -> kms_v1.AsymmetricSignResponse:
        request = kms_v1.AsymmetricSignRequest(
            name=name, digest=digest, digest_crc32c=digest_crc32c
        )
        with self._errors(_SIGN, name):
            return self._client.asymmetric_sign(request, **self._policy(_SIGN))

    def get_key(self, name: str) -> kms_v1.CryptoKey:
        request = kms_v1.GetCryptoKeyRequest(name=name)
        with self._errors(_GET_KEY, name):
            return self._client.get_crypto_key(request, **self._policy(_GET_KEY))

    def create_key(self, key_ring: str, key_id: str, key: kms_v1.CryptoKey) -> kms_v1.CryptoKey:
        # The first version is created explicitly, so its name comes back in an answer.
        request = kms_v1.CreateCryptoKeyRequest(
            parent=key_ring,
            crypto_key_id=key_id,
            crypto_key=key,
            skip_initial_version_creation=True,
        )
        with self._errors(_CREATE_KEY, f"{key_ring}/cryptoKeys/{key_id}"):
            return self._client.create_crypto_key(request, **self._policy(_CREATE_KEY))

    def create_version(self, crypto_key: str) -> kms_v1.CryptoKeyVersion:
        request = kms_v1.CreateCryptoKeyVersionRequest(
            parent=crypto_key, crypto_key_version=kms_v1.CryptoKeyVersion()
        )
        with self._errors(_CREATE_VERSION, crypto_key):
            return self._client.create_crypto_key_version(request, **self._policy(_CREATE_VERSION))

    def _policy(self, rpc: _Rpc) -> _CallPolicy:
        return {
            "retry": self.connection.retry() if rpc.retried else None,
            "timeout": self.connection.timeout,
        }

    @contextlib.contextmanager
    def _errors(self, rpc: _Rpc, resource: str) -> Iterator[None]:
        try:
            yield
        except api_exceptions.RetryError as exc:
            last = exc.cause
            status = _status(last) if last is not None else "no answer"
            detail = f"{status}: {_detail(last)}" if last is not None else status
            raise SignerError(
                f"Cloud KMS at {self.connection.where} did not answer {rpc.name} for {resource} "
                f"within {self.connection.retry_budget:g}s of retries (last error {detail}); "
                "check network access to the endpoint and Cloud KMS availability",
                reason="signer_unavailable",
            ) from None
        except api_exceptions.GoogleAPICallError as exc:
            raise _translate(rpc, resource, exc, self.connection) from None
        except auth_exceptions.GoogleAuthError as exc:
            raise SignerError(
                f"Cloud KMS {rpc.name} for {resource}: credentials failed ({exc}); "
                "check Application Default Credentials",
                reason="kms_unauthenticated",
            ) from None


def _status(exc: BaseException) -> str:
    code = getattr(exc, "grpc_status_code", None)
    return str(getattr(code, "name", None) or type(exc).__name__)


def _detail(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc)


_CHECKS: dict[type[api_exceptions.GoogleAPICallError], tuple[str, str]] = {
    api_exceptions.NotFound: (
        "kms_not_found",
        "check the resource name (project, location, key ring, key, version) and the endpoint",
    ),
    api_exceptions.FailedPrecondition: (
        "kms_failed_precondition",
        "check that the key version is ENABLED ('gcloud kms keys versions describe')",
    ),
    api_exceptions.InvalidArgument: (
        "kms_invalid_argument",
        "check that the key's purpose is ASYMMETRIC_SIGN and its algorithm one meshca "
        f"supports ({', '.join(KMS_ALGORITHMS.values())})",
    ),
    api_exceptions.Unauthenticated: (
        "kms_unauthenticated",
        "check Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, "
        "workload identity, or 'gcloud auth application-default login')",
    ),
    api_exceptions.TooManyRequests: (
        "kms_quota_exceeded",
        "check the project's Cloud KMS quotas; the request may be retried later",
    ),
    api_exceptions.AlreadyExists: ("kms_already_exists", "it already exists"),
}


def _translate(
    rpc: _Rpc, resource: str, exc: api_exceptions.GoogleAPICallError, connection: Connection
) -> SignerError:
    status = _status(exc)
    head = f"Cloud KMS refused {rpc.name} for {resource}: {status} ({_detail(exc)}); "
    if isinstance(exc, api_exceptions.PermissionDenied):
        return SignerError(
            head + f"check that meshca's identity holds {rpc.permission} on the key "
            f"(for example through {rpc.role})",
            reason="kms_permission_denied",
        )
    if isinstance(exc, api_exceptions.ServiceUnavailable | api_exceptions.DeadlineExceeded):
        applied = "" if rpc.retried else "; it may or may not have been applied"
        return SignerError(
            f"Cloud KMS at {connection.where} did not complete {rpc.name} for {resource}: "
            f"{status} ({_detail(exc)}){applied}; check network access to the endpoint",
            reason="signer_unavailable",
        )
    for kind, (reason, check) in _CHECKS.items():
        if isinstance(exc, kind):
            return SignerError(head + check, reason=reason)
    return SignerError(head + "see the Cloud KMS error above", reason="kms_error")


def _build_client(connection: Connection) -> kms_v1.KeyManagementServiceClient:
    try:
        if connection.insecure:
            if not connection.endpoint:
                raise ConfigError(
                    "signer.insecure_endpoint needs signer.endpoint (HOST:PORT of an emulator)"
                )
            # A plaintext channel carrying no credentials at all: emulators only.
            channel = grpc.insecure_channel(connection.endpoint)
            transport = KeyManagementServiceGrpcTransport(channel=channel)
            return kms_v1.KeyManagementServiceClient(transport=transport)
        options = ClientOptions(api_endpoint=connection.endpoint) if connection.endpoint else None
        return kms_v1.KeyManagementServiceClient(client_options=options)
    except auth_exceptions.DefaultCredentialsError as exc:
        raise SignerError(
            f"no Application Default Credentials for Cloud KMS ({exc}); set "
            "GOOGLE_APPLICATION_CREDENTIALS, use workload identity, or run "
            "'gcloud auth application-default login'",
            reason="kms_unauthenticated",
        ) from None


def crc32c(data: bytes) -> int:
    """CRC32C as Cloud KMS computes it for its integrity fields."""
    return int(google_crc32c.value(data))


def checksum(value: object) -> int | None:
    """An ``Int64Value`` checksum field as proto-plus returns it: an int, or None if unset."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def enum_name(value: object) -> str:
    """A KMS enum's name, or the bare number for a value this SDK does not know."""
    return str(getattr(value, "name", value))
