"""Tampering with the ledger behind meshca's back is found and named by sequence.

Each test edits the database with raw SQL, as someone with database access would.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlmodel import Session

from meshca.errors import StoreError
from meshca.store import LedgerEntry, Store, row_hash
from meshca.store import store as store_module

from .helpers import issuance, tamper


def fill(store: Store, n: int) -> None:
    store.append_issuances([issuance(i) for i in range(1, n + 1)])
    assert store.verify_ledger().ok


def problems_at(store: Store, sequence: int) -> list[str]:
    return [p.problem for p in store.verify_ledger().problems if p.sequence == sequence]


def test_edited_field_names_that_row(store: Store, database_url: str) -> None:
    fill(store, 6)
    with tamper(database_url) as db:
        db.execute(
            text("UPDATE ledger SET spiffe_id = 'spiffe://evil.example/x' WHERE sequence = 3")
        )
    report = store.verify_ledger()
    assert not report.ok
    assert report.problem_sequences == {3}
    assert "edited" in report.problems[0].problem


def test_deleted_row_is_named(store: Store, database_url: str) -> None:
    fill(store, 6)
    with tamper(database_url) as db:
        db.execute(text("DELETE FROM ledger WHERE sequence = 4"))
    report = store.verify_ledger()
    assert report.problem_sequences == {4}
    assert report.problems[0].problem == "missing (deleted)"
    assert report.rows_checked == 5


def test_swapped_rows_are_both_named(store: Store, database_url: str) -> None:
    fill(store, 6)
    with tamper(database_url) as db:
        db.execute(text("UPDATE ledger SET sequence = -1 WHERE sequence = 2"))
        db.execute(text("UPDATE ledger SET sequence = 2 WHERE sequence = 5"))
        db.execute(text("UPDATE ledger SET sequence = 5 WHERE sequence = -1"))
    report = store.verify_ledger()
    assert {2, 5} <= report.problem_sequences
    assert "row hash does not match" in problems_at(store, 2)[0]
    assert "row hash does not match" in problems_at(store, 5)[0]


def test_truncated_tail_is_found_through_the_head(store: Store, database_url: str) -> None:
    fill(store, 5)
    with tamper(database_url) as db:
        db.execute(text("DELETE FROM ledger WHERE sequence = 5"))
    report = store.verify_ledger()
    assert report.problem_sequences == {5}
    assert report.head_sequence == 5
    assert "ledger_head records sequence 5 but the ledger ends at 4" in report.problems[0].problem


def test_rehashed_edit_is_caught_by_the_next_row(store: Store, database_url: str) -> None:
    """An attacker who knows the format fixes row 3's hash; row 4 still points at the old one."""
    fill(store, 6)
    with tamper(database_url) as db:
        db.execute(text("UPDATE ledger SET peer_address = '203.0.113.9:1' WHERE sequence = 3"))
        with Session(db) as session:
            edited = session.get(LedgerEntry, 3)
            assert edited is not None
            new_hash = row_hash(edited)
        db.execute(text("UPDATE ledger SET row_hash = :h WHERE sequence = 3"), {"h": new_hash})
    report = store.verify_ledger()
    assert report.problem_sequences == {4}
    assert "prev_hash does not match row 3" in report.problems[0].problem


def test_rehashed_last_row_is_caught_by_the_head(store: Store, database_url: str) -> None:
    fill(store, 3)
    with tamper(database_url) as db:
        db.execute(text("UPDATE ledger SET evidence = 'forged' WHERE sequence = 3"))
        with Session(db) as session:
            edited = session.get(LedgerEntry, 3)
            assert edited is not None
            new_hash = row_hash(edited)
        db.execute(text("UPDATE ledger SET row_hash = :h WHERE sequence = 3"), {"h": new_hash})
    report = store.verify_ledger()
    assert report.problem_sequences == {3}
    assert "ledger_head.last_hash" in report.problems[0].problem


def test_row_appended_without_the_head_is_named(store: Store, database_url: str) -> None:
    fill(store, 3)
    with tamper(database_url) as db:
        db.execute(text("UPDATE ledger_head SET last_sequence = 2"))
    report = store.verify_ledger()
    assert 3 in report.problem_sequences
    assert any("past ledger_head" in p.problem for p in report.problems)


def test_deleted_head_row_is_reported_and_blocks_appends(store: Store, database_url: str) -> None:
    fill(store, 2)
    with tamper(database_url) as db:
        db.execute(text("DELETE FROM ledger_head"))
    report = store.verify_ledger()
    assert report.problem_sequences == {0}
    assert "ledger_head row is missing" in report.problems[0].problem
    with pytest.raises(StoreError, match="ledger_head row is missing") as info:
        store.append_issuance(issuance(3))
    assert info.value.reason == "ledger_corrupt"


def test_verification_spans_batches(
    store: Store, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows are read in batches; breaks on and next to a batch boundary are still named."""
    monkeypatch.setattr(store_module, "VERIFY_BATCH_SIZE", 4)
    fill(store, 15)
    with tamper(database_url) as db:
        db.execute(text("DELETE FROM ledger WHERE sequence IN (4, 5)"))
        db.execute(text("UPDATE ledger SET serial_hex = '00' WHERE sequence = 9"))
    report = store.verify_ledger()
    assert report.rows_checked == 13
    assert report.problem_sequences == {4, 5, 9}
