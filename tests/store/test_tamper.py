"""Tampering with the ledger behind meshca's back is found and named by sequence.

Each test edits the database with raw SQL, as someone with database access would.
"""

from __future__ import annotations

import pytest
from sqlalchemy import insert, text
from sqlmodel import Session

from meshca.errors import StoreError
from meshca.store import LedgerEntry, ProblemKind, Store, row_hash
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
    assert report.totals == {ProblemKind.PAST_HEAD: 1, ProblemKind.HEAD_MISMATCH: 1}
    (past,) = report.listed(ProblemKind.PAST_HEAD)
    assert past.sequence == 3 and past.serial_hex == issuance(3).serial_hex
    assert "lies past the chain's head 2: inserted outside meshca" in past.problem


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
    (gap,) = report.listed(ProblemKind.MISSING)
    assert (gap.sequence, gap.last_sequence, gap.rows) == (4, 5, 2)
    (edited,) = report.listed(ProblemKind.EDITED)
    assert edited.sequence == 9 and edited.serial_hex == "00"


def insert_raw(database_url: str, entry: LedgerEntry) -> None:
    """Insert a row with raw SQL, as someone with database access would."""
    with tamper(database_url) as db:
        db.execute(insert(LedgerEntry.__table__).values(**entry.model_dump()))  # type: ignore[attr-defined]


def test_row_inserted_far_past_the_head_is_named_not_counted_as_missing(
    store: Store, database_url: str
) -> None:
    """A forged row numbered 5000 after a 5-row ledger is one inserted row, named with its
    serial: not 4,994 "missing" rows that hide it."""
    fill(store, 5)
    forged = issuance(77).to_entry(5000, "ff" * 32)
    insert_raw(database_url, forged)
    report = store.verify_ledger()
    assert not report.ok
    assert report.totals == {ProblemKind.PAST_HEAD: 1}
    (problem,) = report.problems
    assert problem.describe() == (
        f"sequence 5000 (serial {forged.serial_hex}): lies past the chain's head 5: "
        "inserted outside meshca"
    )
    assert report.head_sequence == 5 and report.rows_checked == 6


def test_every_problem_class_is_reported_and_counted_past_the_listing_limit(
    store: Store, database_url: str
) -> None:
    """Thirty edited rows do not crowd out a deleted range and an inserted row: each class
    lists its first rows (20 by default) and counts the rest."""
    fill(store, 40)
    with tamper(database_url) as db:
        db.execute(text("UPDATE ledger SET evidence = 'forged' WHERE sequence <= 30"))
        db.execute(text("DELETE FROM ledger WHERE sequence IN (33, 34, 35)"))
    insert_raw(database_url, issuance(99).to_entry(41, "00" * 32))
    report = store.verify_ledger()
    assert report.totals == {
        ProblemKind.EDITED: 30,
        ProblemKind.MISSING: 1,
        ProblemKind.PAST_HEAD: 1,
    }
    assert len(report.listed(ProblemKind.EDITED)) == 20
    assert report.omitted(ProblemKind.EDITED) == 10
    assert [p.sequence for p in report.listed(ProblemKind.EDITED)][:3] == [1, 2, 3]
    (gap,) = report.listed(ProblemKind.MISSING)
    assert (gap.sequence, gap.last_sequence) == (33, 35)
    (past,) = report.listed(ProblemKind.PAST_HEAD)
    assert past.sequence == 41
