"""Checks on what the servers handed out: sampled certificates and meshca's ledger."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509 import verification


def _count(db: Path, table: str) -> int | None:
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            (count,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            return int(count)
    except sqlite3.Error:
        return None


def ledger_rows(db: Path) -> int | None:
    """Certificates meshca recorded (the server's own TLS certificates included)."""
    return _count(db, "ledger")


def intermediate_rows(db: Path) -> int | None:
    """Issuing intermediates the root has signed (one per worker start or rotation)."""
    return _count(db, "intermediates")


def uri_sans(sample: dict[str, Any]) -> list[str]:
    leaf = x509.load_pem_x509_certificate(sample["chain"][0].encode())
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def verify_meshca(samples: list[dict[str, Any]], bundle: list[x509.Certificate]) -> str:
    """Each sampled chain verifies to the bundle and names the identity asked for."""
    if not samples:
        return "none sampled"
    store = verification.Store(bundle)
    good = 0
    problems = []
    for sample in samples:
        leaf, *rest = (x509.load_pem_x509_certificate(c.encode()) for c in sample["chain"])
        verifier = (
            verification.PolicyBuilder()
            .store(store)
            .time(datetime.now(UTC))
            .build_client_verifier()
        )
        try:
            verifier.verify(leaf, [c for c in rest if c not in bundle])
        except verification.VerificationError as exc:
            problems.append(str(exc))
            continue
        if uri_sans(sample) != [sample["spiffe_id"]]:
            problems.append(f"SAN {uri_sans(sample)} != {sample['spiffe_id']}")
            continue
        good += 1
    text = f"{good}/{len(samples)} verify (chain + SPIFFE ID)"
    return text if not problems else f"{text}; {problems[0]}"


def verify_cfssl(
    samples: list[dict[str, Any]], root: x509.Certificate, issuer: str = "cfssl root"
) -> str:
    """Each sampled certificate is signed by ``root`` (cfssl's, or the null CA's) and
    within its validity."""
    if not samples:
        return "none sampled"
    good = 0
    problems = []
    now = datetime.now(UTC)
    for sample in samples:
        leaf = x509.load_pem_x509_certificate(sample["chain"][0].encode())
        try:
            leaf.verify_directly_issued_by(root)
        except (InvalidSignature, ValueError, TypeError) as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
            continue
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            problems.append("outside its validity")
            continue
        good += 1
    text = f"{good}/{len(samples)} verify ({issuer})"
    return text if not problems else f"{text}; {problems[0]}"
