"""Ledger rows of certificates a node agent obtained: who asked and on which node are
recorded and hashed (format v2); an edit of either is found like any other, and rows
written before revision 0006 verify unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import datetime
from pathlib import Path

from alembic import command
from sqlalchemy import create_engine, insert, text, update

from meshca.store import GENESIS_HASH, LedgerEntry, LedgerHead, NewIssuance, Store
from meshca.store.chain import canonical_bytes
from meshca.store.migrate import alembic_config

from .helpers import issuance, tamper

AGENT = "spiffe://cluster.local/ns/meshca-system/sa/meshca-agent"


def delegated(n: int, node: str | None = "node-a") -> NewIssuance:
    return dataclasses.replace(issuance(n), agent_spiffe_id=AGENT, node_name=node)


def test_delegated_rows_round_trip_and_verify(store: Store) -> None:
    store.append_issuances([issuance(1), delegated(2), delegated(3, node=None), issuance(4)])
    assert store.verify_ledger().ok
    rows = {row.sequence: row for row in store.list_ledger()}
    assert (rows[2].agent_spiffe_id, rows[2].node_name) == (AGENT, "node-a")
    assert (rows[3].agent_spiffe_id, rows[3].node_name) == (AGENT, None)
    assert (rows[1].agent_spiffe_id, rows[1].node_name) == (None, None)


def _field(value: object) -> bytes:
    """The documented field encoding, written out again independently of meshca's."""
    if value is None:
        return b"N" + bytes(8)
    if isinstance(value, int):
        kind, data = b"I", str(value).encode()
    elif isinstance(value, datetime):
        kind, data = b"T", value.strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()
    else:
        kind, data = b"S", str(value).encode()
    return kind + len(data).to_bytes(8, "big") + data


V1_ORDER = (
    "sequence serial_hex spiffe_id auth_method evidence peer_address not_before not_after "
    "intermediate_fingerprint request_id csr_sha256 certificate_pem issued_at prev_hash"
).split()


def test_v1_rows_keep_their_encoding_and_v2_rows_add_two_fields() -> None:
    plain = issuance(1).to_row(1, GENESIS_HASH)
    v1 = b"meshca-ledger-v1\n" + b"".join(_field(getattr(plain, n)) for n in V1_ORDER)
    assert canonical_bytes(plain) == v1
    assert plain.row_hash == hashlib.sha256(v1).hexdigest()

    row = delegated(1).to_row(1, GENESIS_HASH)
    fields = b"".join(_field(getattr(row, n)) for n in V1_ORDER)
    v2 = b"meshca-ledger-v2\n" + fields + _field(AGENT) + _field("node-a")
    assert canonical_bytes(row) == v2
    assert row.row_hash == hashlib.sha256(v2).hexdigest()
    # The format is a compatibility contract: this row's hash never changes.
    assert row.row_hash == "a63bb98f3e53bde862ad0e385cc2516c67ef366f0cc1f03858b07bbaaf2a5cec"


def test_editing_or_clearing_the_agent_or_node_is_found(store: Store, database_url: str) -> None:
    store.append_issuances([delegated(1), delegated(2), delegated(3)])
    with tamper(database_url) as db:
        db.execute(text("UPDATE ledger SET node_name = 'node-b' WHERE sequence = 1"))
        db.execute(
            text("UPDATE ledger SET agent_spiffe_id = NULL, node_name = NULL WHERE sequence = 3")
        )
    report = store.verify_ledger()
    assert report.problem_sequences == {1, 3}
    assert all("edited" in p.problem for p in report.problems)


def test_rows_written_before_0006_verify_after_the_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'meshca.db'}"
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "0005_join_tokens")
        row = issuance(1).to_row(1, GENESIS_HASH)
        old_columns = {
            k: v for k, v in row.columns().items() if k not in ("agent_spiffe_id", "node_name")
        }
        with engine.begin() as connection:  # as revision 0005 wrote it: no such columns
            connection.execute(insert(LedgerEntry.__table__).values(**old_columns))  # type: ignore[arg-type]
            connection.execute(
                update(LedgerHead.__table__).values(last_sequence=1, last_hash=row.row_hash)  # type: ignore[arg-type]
            )
    finally:
        engine.dispose()
    store = Store.open(url)
    try:
        assert store.verify_ledger().ok
        store.append_issuances([delegated(2)])
        report = store.verify_ledger()
        assert report.ok, report.problems
        assert store.counts().issued == 2
    finally:
        store.close()
