"""The Signer seam: the only thing the CA knows about where a CA private key lives.

A Signer exposes a key reference, its algorithm, its public key and ``sign(data)``.
Signatures are what X.509 expects for the algorithm: DER-encoded ECDSA (SHA-256 for
P-256, SHA-384 for P-384) or RSASSA-PKCS1-v1_5 with SHA-256. ``sign`` may block (an HSM
or KMS round trip): async callers run it with ``asyncio.to_thread``.

:func:`as_private_key` wraps any Signer in cryptography's private-key interface so that
``CertificateBuilder.sign()`` does all the X.509 encoding and calls back into the Signer
only for the signature itself.
"""

from __future__ import annotations

from typing import Any, NoReturn, Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from meshca.errors import SignerError
from meshca.pki.keys import KeyAlgorithm, PrivateKey, PublicKey


@runtime_checkable
class Signer(Protocol):
    """A CA signing key held by some backend."""

    @property
    def backend(self) -> str:
        """Backend name: ``file``, ``pkcs11`` or ``gcpkms``."""
        ...

    @property
    def key_id(self) -> str:
        """A reference to the key inside its backend (path, label, resource name)."""
        ...

    @property
    def algorithm(self) -> KeyAlgorithm: ...

    def public_key(self) -> PublicKey: ...

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` (hashing it with the algorithm's digest). Raise SignerError on failure."""
        ...


def _refuse(what: str) -> NoReturn:
    raise SignerError(f"{what} is not available for a CA key held by a signer backend")


def _check_digest(signer: Signer, algorithm: hashes.HashAlgorithm) -> None:
    if isinstance(algorithm, Prehashed):
        _refuse("signing a pre-hashed digest")
    expected = signer.algorithm.hash_algorithm()
    if algorithm.name != expected.name:
        raise SignerError(
            f"{signer.algorithm} keys sign with {expected.name}, not {algorithm.name}"
        )


class _EcSignerKey(ec.EllipticCurvePrivateKey):
    def __init__(self, signer: Signer) -> None:
        self._signer = signer
        pub = signer.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        self._public = pub

    def sign(self, data: Any, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            _refuse(f"signature algorithm {signature_algorithm!r}")
        _check_digest(self._signer, signature_algorithm.algorithm)  # type: ignore[arg-type]
        return self._signer.sign(bytes(data))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        _refuse("key exchange")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _refuse("exporting private numbers")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _refuse("exporting the private key")

    def __copy__(self) -> _EcSignerKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _EcSignerKey:
        return self


class _RsaSignerKey(rsa.RSAPrivateKey):
    def __init__(self, signer: Signer) -> None:
        self._signer = signer
        pub = signer.public_key()
        assert isinstance(pub, rsa.RSAPublicKey)
        self._public = pub

    def sign(
        self,
        data: Any,
        padding_: padding.AsymmetricPadding,
        algorithm: Any,
    ) -> bytes:
        if not isinstance(padding_, padding.PKCS1v15):
            _refuse(f"RSA padding {padding_.name}")
        _check_digest(self._signer, algorithm)
        return self._signer.sign(bytes(data))

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        _refuse("decryption")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        _refuse("exporting private numbers")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _refuse("exporting the private key")

    def __copy__(self) -> _RsaSignerKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _RsaSignerKey:
        return self


def as_private_key(signer: Signer) -> PrivateKey:
    """Wrap a Signer so cryptography's ``CertificateBuilder.sign()`` can use it."""
    if signer.algorithm.is_ec:
        return _EcSignerKey(signer)
    return _RsaSignerKey(signer)


def close_signer(signer: Signer) -> None:
    """Release a signer's sessions or clients, for backends that hold any."""
    close = getattr(signer, "close", None)
    if callable(close):
        close()
