"""The chain verifier on its own: bounded output for a badly damaged ledger."""

from __future__ import annotations

from meshca.store import GENESIS_HASH, LedgerEntry, LedgerHead
from meshca.store.verify import ChainVerifier

from .helpers import issuance


def chain(n: int) -> list[LedgerEntry]:
    rows, prev = [], GENESIS_HASH
    for i in range(1, n + 1):
        row = issuance(i).to_entry(i, prev)
        rows.append(row)
        prev = row.row_hash
    return rows


def test_a_huge_gap_is_reported_without_listing_every_sequence() -> None:
    rows = chain(2)
    far = issuance(3).to_entry(10**12, rows[-1].row_hash)
    verifier = ChainVerifier(
        head=LedgerHead(id=1, last_sequence=far.sequence, last_hash=far.row_hash),
        max_problems=50,
    )
    for row in [*rows, far]:
        verifier.feed(row)
    report = verifier.finish()
    assert len(report.problems) == 50
    assert report.problems[0].sequence == 3
    missing = 10**12 - 3  # sequences 3 .. 10**12 - 1
    assert report.problems_omitted == missing - 50
    assert not report.ok


def test_an_intact_chain_is_ok() -> None:
    rows = chain(5)
    verifier = ChainVerifier(head=LedgerHead(id=1, last_sequence=5, last_hash=rows[-1].row_hash))
    for row in rows:
        verifier.feed(row)
    report = verifier.finish()
    assert report.ok and report.rows_checked == 5 and report.head_sequence == 5
