"""Key objects in a PKCS#11 token: finding, reading, generating and naming them.

Public keys are read from the token's public key object (CKA_EC_PARAMS + CKA_EC_POINT,
or CKA_MODULUS + CKA_PUBLIC_EXPONENT) and turned into ``cryptography`` keys; nothing
here builds DER by hand (python-pkcs11 encodes EC parameters and SubjectPublicKeyInfo).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import quote

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.types import Object, Session, SignMixin
from pkcs11.types import PrivateKey as P11PrivateKey
from pkcs11.types import PublicKey as P11PublicKey
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from meshca.errors import SignerError
from meshca.pki.keys import ALLOWED_DESCRIPTION, KeyAlgorithm, PublicKey, UnsupportedKeyError

__all__ = ["Attribute"]

# Named-curve OIDs (RFC 5480, section 2.1.1.1).
_CURVE_OIDS = {KeyAlgorithm.EC_P256: "1.2.840.10045.3.1.7", KeyAlgorithm.EC_P384: "1.3.132.0.34"}
_CURVES: dict[bytes, ec.EllipticCurve] = {
    encode_named_curve_parameters(_CURVE_OIDS[KeyAlgorithm.EC_P256]): ec.SECP256R1(),
    encode_named_curve_parameters(_CURVE_OIDS[KeyAlgorithm.EC_P384]): ec.SECP384R1(),
}
_RSA_EXPONENT = 65537

# RFC 7512 section 2.3: pk11-res-avail characters may stay unescaped in attribute values.
_URI_SAFE = ":[]@!$'()*+,="


@dataclass(frozen=True, slots=True)
class KeySearch:
    """Which token and key a signer means; ``key_id`` narrows the label to one CKA_ID."""

    token_label: str | None
    token_serial: str | None
    key_label: str
    key_id: bytes | None

    def pinned(self, key_id: bytes) -> KeySearch:
        """The same search, fixed to the CKA_ID found first (a reopen finds that key only)."""
        return replace(self, key_id=key_id or self.key_id)

    def describe(self) -> str:
        suffix = f" and id {self.key_id.hex()}" if self.key_id else ""
        return f"label {self.key_label!r}{suffix}"


def pkcs11_uri(token_label: str, key_label: str, key_id: bytes) -> str:
    """The RFC 7512 URI of a key: ``pkcs11:token=...;object=...;id=%xx...``."""
    parts = [
        f"token={quote(token_label, safe=_URI_SAFE)}",
        f"object={quote(key_label, safe=_URI_SAFE)}",
    ]
    if key_id:
        parts.append("id=" + "".join(f"%{byte:02X}" for byte in key_id))
    return "pkcs11:" + ";".join(parts)


def attr_bytes(obj: Object, attribute: Attribute) -> bytes:
    value = obj[attribute]
    if isinstance(value, bytes):
        return value
    raise SignerError(
        f"PKCS#11 attribute {attribute.name} of {obj!r} is not a byte string",
        reason="key_not_allowed",
    )


def _attr_bool(obj: Object, attribute: Attribute) -> bool:
    return bool(obj[attribute])


def extractable(private: P11PrivateKey) -> bool:
    try:
        return _attr_bool(private, Attribute.EXTRACTABLE) or not _attr_bool(
            private, Attribute.SENSITIVE
        )
    except PKCS11Error:
        return False  # the token will not say; it is its policy, not ours


def _template(
    search: KeySearch, cls: ObjectClass, *, by_id: bool = False
) -> dict[Attribute, object]:
    template: dict[Attribute, object] = {Attribute.CLASS: cls}
    if not (by_id and search.key_id):
        template[Attribute.LABEL] = search.key_label
    if search.key_id:
        template[Attribute.ID] = search.key_id
    return template


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key object, and the same object seen through its signing interface."""

    obj: P11PrivateKey
    signer: SignMixin


def find_private(session: Session, token_label: str, search: KeySearch) -> SigningKey | None:
    """The private key the search names, None if absent, SignerError if ambiguous."""
    found = [
        obj
        for obj in session.get_objects(_template(search, ObjectClass.PRIVATE_KEY))
        if isinstance(obj, P11PrivateKey)
    ]
    if len(found) > 1:
        ids = ", ".join(attr_bytes(k, Attribute.ID).hex() or "(none)" for k in found)
        raise SignerError(
            f"{len(found)} private keys with {search.describe()} on token {token_label!r} "
            f"(ids {ids}); set key_id to pick one",
            reason="key_ambiguous",
        )
    if not found:
        return None
    key = found[0]
    if not isinstance(key, SignMixin):  # python-pkcs11 adds sign() only when CKA_SIGN is true
        raise SignerError(
            f"the private key with {search.describe()} on token {token_label!r} may not sign "
            "(CKA_SIGN is false)",
            reason="key_not_usable",
        )
    return SigningKey(key, key)


def public_visible(session: Session, search: KeySearch) -> bool:
    return any(True for _ in session.get_objects(_template(search, ObjectClass.PUBLIC_KEY)))


def find_public(session: Session, token_label: str, search: KeySearch) -> P11PublicKey:
    """The public half: by CKA_ID (the PKCS#11 convention for pairs), then by label too."""
    found = [
        obj
        for obj in session.get_objects(_template(search, ObjectClass.PUBLIC_KEY, by_id=True))
        if isinstance(obj, P11PublicKey)
    ]
    if len(found) > 1:
        found = [k for k in found if k[Attribute.LABEL] == search.key_label]
    if len(found) != 1:
        raise SignerError(
            f"token {token_label!r} holds the private key with {search.describe()} but "
            f"{'no' if not found else 'more than one'} matching public key object; meshca "
            "reads the public key from that object",
            reason="key_not_found",
        )
    return found[0]


def not_found(token_label: str, search: KeySearch, *, lost: bool) -> SignerError:
    if lost:
        return SignerError(
            f"the non-persistent key with {search.describe()} is gone from token "
            f"{token_label!r} (session keys die with the HSM connection); create a new one",
            reason="key_lost",
        )
    return SignerError(
        f"no private key with {search.describe()} on token {token_label!r}; {_ADMIN_HINT}",
        reason="key_not_found",
    )


_ADMIN_HINT = "create it with `meshca admin root create --signer pkcs11`"


def public_key(obj: P11PublicKey) -> PublicKey:
    """The cryptography public key for a token's EC or RSA public key object."""
    key_type = obj[Attribute.KEY_TYPE]
    try:
        if key_type == KeyType.RSA:
            modulus = int.from_bytes(attr_bytes(obj, Attribute.MODULUS), "big")
            exponent = int.from_bytes(attr_bytes(obj, Attribute.PUBLIC_EXPONENT), "big")
            return rsa.RSAPublicNumbers(exponent, modulus).public_key()
        if key_type == KeyType.EC:
            return _ec_public_key(obj)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SignerError(
            f"cannot read the public key object {obj!r}: {exc}", reason="key_not_allowed"
        ) from None
    name = getattr(key_type, "name", str(key_type))
    raise SignerError(f"key is {name}; allowed: {ALLOWED_DESCRIPTION}", reason="key_not_allowed")


def _ec_public_key(obj: P11PublicKey) -> PublicKey:
    params = attr_bytes(obj, Attribute.EC_PARAMS)
    point = attr_bytes(obj, Attribute.EC_POINT)
    curve = _CURVES.get(params)
    if curve is not None and len(point) == 1 + 2 * ((curve.key_size + 7) // 8):
        # A bare X9.62 point: some modules leave out the DER OCTET STRING around it.
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    loaded = serialization.load_der_public_key(encode_ec_public_key(obj))
    if not isinstance(loaded, ec.EllipticCurvePublicKey):
        raise ValueError("CKA_EC_POINT does not hold an EC point")
    return loaded


def algorithm_of(public: PublicKey, token_label: str, key_label: str) -> KeyAlgorithm:
    try:
        return KeyAlgorithm.of(public)
    except UnsupportedKeyError as exc:
        raise SignerError(
            f"key {key_label!r} on token {token_label!r}: {exc}", reason="key_not_allowed"
        ) from None


def same_key(a: PublicKey, b: PublicKey) -> bool:
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(der, spki) == b.public_bytes(der, spki)


def mechanism_for(
    algorithm: KeyAlgorithm, available: set[Mechanism], token_label: str
) -> tuple[Mechanism, bool]:
    """The signing mechanism, and whether meshca hashes first (True) or the token does.

    ECDSA: CKM_ECDSA over a digest computed here (only 32 or 48 bytes cross to the HSM),
    else CKM_ECDSA_SHA256/384. RSA: CKM_SHA256_RSA_PKCS (RSASSA-PKCS1-v1_5, RFC 8017).
    """
    if algorithm.is_ec:
        combined = (
            Mechanism.ECDSA_SHA384 if algorithm is KeyAlgorithm.EC_P384 else Mechanism.ECDSA_SHA256
        )
        if Mechanism.ECDSA in available:
            return Mechanism.ECDSA, True
        if combined in available:
            return combined, False
        wanted = f"CKM_ECDSA or CKM_{combined.name}"
    else:
        if Mechanism.SHA256_RSA_PKCS in available:
            return Mechanism.SHA256_RSA_PKCS, False
        wanted = "CKM_SHA256_RSA_PKCS"
    raise SignerError(
        f"token {token_label!r} does not offer {wanted}, needed to sign with {algorithm} keys",
        reason="key_not_usable",
    )


def refuse_existing(session: Session, token_label: str, key_label: str) -> None:
    existing = list(session.get_objects({Attribute.LABEL: key_label}))
    if existing:
        raise SignerError(
            f"token {token_label!r} already holds {len(existing)} object(s) labelled "
            f"{key_label!r}; meshca never replaces a key (choose another label, or delete "
            "the old key with the HSM's own tools if you really mean to)",
            reason="key_exists",
        )


def generate(
    session: Session,
    token_label: str,
    algorithm: KeyAlgorithm,
    search: KeySearch,
    persistent: bool,
) -> None:
    """Generate a signing key pair in the token; the private half never leaves it."""
    private_template: dict[Attribute, object] = {
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
    public_template: dict[Attribute, object] = {
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
    }
    if algorithm.is_ec:
        key_type, bits = KeyType.EC, None
        public_template[Attribute.EC_PARAMS] = encode_named_curve_parameters(_CURVE_OIDS[algorithm])
    else:
        key_type, bits = KeyType.RSA, algorithm.rsa_bits
        public_template[Attribute.PUBLIC_EXPONENT] = _RSA_EXPONENT.to_bytes(3, "big")
    try:
        session.generate_keypair(
            key_type,
            bits,
            id=search.key_id,
            label=search.key_label,
            store=persistent,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            public_template=public_template,
            private_template=private_template,
        )
    except PKCS11Error as exc:
        raise SignerError(
            f"token {token_label!r} could not generate a {algorithm} key: "
            f"{type(exc).__name__} {exc}".strip(),
            reason="key_generation_failed",
        ) from None


def delete_quietly(session: Session, search: KeySearch) -> None:
    """Remove a key pair that was just generated but failed its checks (best effort)."""
    try:
        for obj in objects_of(session, search):
            obj.destroy()
    except PKCS11Error:
        pass


def objects_of(session: Session, search: KeySearch) -> list[Object]:
    """The key pair's objects (private and public), for deletion."""
    found: list[Object] = []
    for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        found.extend(session.get_objects(_template(search, cls)))
    return found


def x509_signature(public: PublicKey, raw: bytes) -> bytes:
    """The signature as X.509 carries it: PKCS#11's raw r||s becomes DER (RFC 3279 2.2.3)."""
    if isinstance(public, ec.EllipticCurvePublicKey):
        size = (public.curve.key_size + 7) // 8
        if len(raw) != 2 * size:
            raise SignerError(
                f"the token returned a {len(raw)}-byte ECDSA signature, "
                f"not r||s of {2 * size} bytes",
                reason="sign_failed",
            )
        r, s = int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
        return encode_dss_signature(r, s)
    if len(raw) != public.key_size // 8:
        raise SignerError(
            f"the token returned a {len(raw)}-byte RSA signature for a {public.key_size}-bit key",
            reason="sign_failed",
        )
    return raw
