"""Root lifecycle: find the active root at start-up, create the first one, prepare the next.

A rotation is ``prepare`` (a new key and self-signed root, published in every trust
bundle but signing nothing), ``activate`` (it signs every replica's next intermediate;
the old root becomes ``retiring``) and ``retire`` (the old root leaves the bundle once
the ledger holds no unexpired certificate under it). The store checks and applies each
step in one locked transaction (:mod:`meshca.store.root_lifecycle`); this module makes
the certificates and opens the key a root record names.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.config import FileSignerConfig, GcpKmsSignerConfig, Pkcs11SignerConfig, SignerConfig
from meshca.errors import ConfigError, SignerError
from meshca.pki import profile
from meshca.signers.base import Signer
from meshca.spiffe import TrustDomain
from meshca.store import RootRecord, Store

log = logging.getLogger(__name__)


def _spki(key: object) -> bytes:
    assert hasattr(key, "public_bytes")
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _record(signer: Signer, cert: x509.Certificate, state: str, now: datetime) -> RootRecord:
    return RootRecord(
        fingerprint=profile.fingerprint(cert),
        subject=cert.subject.rfc4514_string(),
        backend=signer.backend,
        key_ref=signer.key_id,
        algorithm=str(signer.algorithm),
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        state=state,
        created_at=now,
    )


def create_root(
    store: Store, signer: Signer, trust_domain: TrustDomain, *, ttl: timedelta, now: datetime
) -> RootRecord:
    """Self-sign a root with ``signer`` and record it as the active root."""
    cert = profile.build_root(signer, trust_domain, ttl=ttl, now=now)
    return store.add_root(_record(signer, cert, "active", now))


def prepare_root(
    store: Store,
    signer: Signer,
    trust_domain: TrustDomain,
    *,
    ttl: timedelta,
    now: datetime,
    cross_signer: Signer | None = None,
) -> RootRecord:
    """Self-sign a root with ``signer`` (a new key) and record it as ``prepared``.

    ``cross_signer``, the active root's key, also certifies the new root's key (see
    :func:`meshca.pki.profile.build_cross_certificate`). The store refuses (RootRefusedError)
    when no root is active or one is already prepared, checked under its lock.
    """
    cert = profile.build_root(signer, trust_domain, ttl=ttl, now=now)
    record = _record(signer, cert, "prepared", now)
    if cross_signer is not None:
        active = store.check_prepare_root()
        old = x509.load_pem_x509_certificate(active.certificate_pem.encode())
        check_key(active, cross_signer)
        cross = profile.build_cross_certificate(cross_signer, old, cert, now=now)
        record.cross_certificate_pem = cross.public_bytes(serialization.Encoding.PEM).decode()
    return store.prepare_root(record)


def check_key(root: RootRecord, signer: Signer) -> None:
    """SignerError unless ``signer`` holds the key of ``root``'s certificate."""
    cert = x509.load_pem_x509_certificate(root.certificate_pem.encode())
    if _spki(cert.public_key()) != _spki(signer.public_key()):
        raise SignerError(
            f"the key {signer.key_id} is not the key of root {root.fingerprint[:16]} "
            f"({root.key_ref})",
            reason="root_key_mismatch",
        )


def signer_config_for(root: RootRecord, configured: SignerConfig) -> SignerConfig:
    """The configured signer section pointed at ``root``'s own key.

    The section supplies how to reach the backend (PKCS#11 module, token and PIN; KMS
    endpoint); the root record says which key: a file path, a PKCS#11 URI (RFC 7512
    ``object`` and ``id``), a KMS key version.
    """
    if root.backend != configured.kind:
        raise ConfigError(
            f"root {root.fingerprint[:16]} lives in the {root.backend} backend but the "
            f"configured signer is {configured.kind}; configure a {root.backend} signer section"
        )
    if isinstance(configured, FileSignerConfig):
        return configured.model_copy(update={"key_file": Path(root.key_ref)})
    if isinstance(configured, GcpKmsSignerConfig):
        return configured.model_copy(update={"key_version": root.key_ref})
    assert isinstance(configured, Pkcs11SignerConfig)
    attributes = dict(
        part.split("=", 1) for part in root.key_ref.removeprefix("pkcs11:").split(";") if part
    )
    key_id = bytes(unquote(attributes.get("id", ""), encoding="latin-1"), "latin-1").hex()
    return configured.model_copy(
        update={"key_label": unquote(attributes.get("object", "")), "key_id": key_id or None}
    )


def open_root_signer(root: RootRecord, configured: SignerConfig, state_dir: Path) -> Signer:
    """Open the key ``root`` names and check it is that root's key (SignerError if gone)."""
    from meshca.signers.factory import open_signer

    signer, _ = open_signer(signer_config_for(root, configured), state_dir=state_dir, create=False)
    try:
        check_key(root, signer)
    except BaseException:
        from meshca.signers.base import close_signer

        close_signer(signer)
        raise
    return signer


def load_active_root(
    store: Store,
    signer: Signer,
    trust_domain: TrustDomain,
    *,
    now: datetime,
    create_ttl: timedelta | None,
) -> tuple[RootRecord, bool]:
    """The active root, checked against the signer's key; created when allowed and absent.

    ``create_ttl`` None means creating a root is not allowed here (hardware backends: the
    operator runs ``meshca admin root create``). Returns (record, created).
    """
    active = store.active_root()
    if active is None:
        if create_ttl is None:
            raise ConfigError(
                f"no root CA is recorded and the {signer.backend} signer does not create one "
                f"at start-up; run `meshca admin root create --signer {signer.backend}` first"
            )
        record = create_root(store, signer, trust_domain, ttl=create_ttl, now=now)
        log.info("created root CA %s (%s)", record.fingerprint[:16], record.subject)
        return record, True
    cert = x509.load_pem_x509_certificate(active.certificate_pem.encode())
    if _spki(cert.public_key()) != _spki(signer.public_key()):
        raise ConfigError(
            f"the active root {active.fingerprint[:16]} ({active.key_ref}) does not match the "
            f"configured {signer.backend} key {signer.key_id}; point the signer at the root's "
            "key or use the database that belongs to this key"
        )
    if active.not_after <= now:
        raise ConfigError(
            f"the active root {active.fingerprint[:16]} expired at "
            f"{active.not_after.isoformat()}: nothing it signs verifies any more; run "
            "`meshca admin root prepare`, then `meshca admin root activate ID --force` "
            "(every workload then needs the new bundle), and start the server again"
        )
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if str(trust_domain.id) not in uris:
        raise ConfigError(
            f"the active root is for {', '.join(uris) or 'another trust domain'}, "
            f"not {trust_domain.id}; the trust domain of an existing CA cannot change"
        )
    return active, False
