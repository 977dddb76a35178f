"""Key algorithms meshca accepts, and what each implies for signing.

Design rule: ECDSA P-256 by default; P-384 and RSA 2048/3072/4096 accepted; nothing weaker.
"""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

ALLOWED_DESCRIPTION = "ECDSA P-256, ECDSA P-384, RSA 2048, RSA 3072, RSA 4096"


class UnsupportedKeyError(ValueError):
    """A key's type or size is not one meshca accepts. Callers wrap it in their own error."""


class KeyAlgorithm(enum.StrEnum):
    """A key type and size; the value is the name used in config and the CLI."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    @property
    def is_ec(self) -> bool:
        return self in (KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P384)

    @property
    def rsa_bits(self) -> int:
        return int(self.value.split("-")[1]) if not self.is_ec else 0

    def hash_algorithm(self) -> hashes.SHA256 | hashes.SHA384:
        """The digest used when this key signs a certificate (SHA-384 for P-384, else SHA-256)."""
        return hashes.SHA384() if self is KeyAlgorithm.EC_P384 else hashes.SHA256()

    def generate(self) -> PrivateKey:
        """A fresh in-memory private key of this algorithm."""
        if self is KeyAlgorithm.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        if self is KeyAlgorithm.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        return rsa.generate_private_key(public_exponent=65537, key_size=self.rsa_bits)

    @classmethod
    def of(cls, key: PublicKey | PrivateKey | object) -> KeyAlgorithm:
        """Classify a key, raising UnsupportedKeyError with a description of what it is."""
        if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
            curve = key.curve.name
            if curve == "secp256r1":
                return cls.EC_P256
            if curve == "secp384r1":
                return cls.EC_P384
            raise UnsupportedKeyError(f"key is ECDSA {curve}; allowed: {ALLOWED_DESCRIPTION}")
        if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
            bits = key.key_size
            if bits in (2048, 3072, 4096):
                return cls(f"rsa-{bits}")
            raise UnsupportedKeyError(f"key is RSA-{bits}; allowed: {ALLOWED_DESCRIPTION}")
        name = (
            type(key).__name__.removeprefix("_").replace("PublicKey", "").replace("PrivateKey", "")
        )
        raise UnsupportedKeyError(f"key is {name or 'unknown'}; allowed: {ALLOWED_DESCRIPTION}")
