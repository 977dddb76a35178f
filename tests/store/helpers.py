"""Test data and raw database access for the store tests.

``tamper`` opens a plain SQLAlchemy connection, without meshca's engine set-up, the way
someone with direct database access would edit rows behind meshca's back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, create_engine, text

from meshca.store import GENESIS_HASH, NewIssuance

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
INTERMEDIATE_FP = "ab" * 32


def issuance(n: int, *, request_id: str | None = None, spiffe_id: str | None = None) -> NewIssuance:
    """A plausible ledger row, distinct for each ``n``."""
    issued = T0 + timedelta(seconds=n)
    return NewIssuance(
        serial_hex=f"{0x7F00000000000000 + n:x}",
        spiffe_id=spiffe_id or f"spiffe://cluster.local/ns/default/sa/workload-{n}",
        auth_method="k8s-jwt",
        evidence=f"k8s:ns:default,k8s:sa:workload-{n}",
        peer_address=f"10.1.0.{n % 250}:{40000 + n}",
        not_before=issued - timedelta(minutes=1),
        not_after=issued + timedelta(hours=1),
        intermediate_fingerprint=INTERMEDIATE_FP,
        certificate_pem=f"-----BEGIN CERTIFICATE-----\nleaf{n}\n-----END CERTIFICATE-----\n",
        issued_at=issued,
        request_id=request_id,
        csr_sha256=f"{n:064x}",
    )


@contextmanager
def tamper(database_url: str) -> Iterator[Connection]:
    """A raw connection in a transaction, committed on exit."""
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            yield connection
    finally:
        engine.dispose()


def reset_ledger(database_url: str) -> None:
    """Empty the ledger and rewind its head, as if freshly migrated."""
    with tamper(database_url) as db:
        db.execute(text("DELETE FROM ledger"))
        db.execute(
            text("UPDATE ledger_head SET last_sequence = 0, last_hash = :h WHERE id = 1"),
            {"h": GENESIS_HASH},
        )
