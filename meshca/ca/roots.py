"""Root lifecycle: find the active root at start-up, or create it for the file backend."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.errors import ConfigError
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


def create_root(
    store: Store, signer: Signer, trust_domain: TrustDomain, *, ttl: timedelta, now: datetime
) -> RootRecord:
    """Self-sign a root with ``signer`` and record it as the active root."""
    cert = profile.build_root(signer, trust_domain, ttl=ttl, now=now)
    record = RootRecord(
        fingerprint=profile.fingerprint(cert),
        subject=cert.subject.rfc4514_string(),
        backend=signer.backend,
        key_ref=signer.key_id,
        algorithm=str(signer.algorithm),
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        state="active",
        created_at=now,
    )
    return store.add_root(record)


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
            f"the active root {active.fingerprint[:16]} expired at {active.not_after.isoformat()}"
        )
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if str(trust_domain.id) not in uris:
        raise ConfigError(
            f"the active root is for {', '.join(uris) or 'another trust domain'}, "
            f"not {trust_domain.id}; the trust domain of an existing CA cannot change"
        )
    return active, False
