"""The chain verifier on its own: bounded output for a badly damaged ledger."""

from __future__ import annotations

from meshca.store import GENESIS_HASH, LedgerEntry, LedgerHead, ProblemKind
from meshca.store.verify import ChainVerifier

from .helpers import issuance


def chain(n: int) -> list[LedgerEntry]:
    rows, prev = [], GENESIS_HASH
    for i in range(1, n + 1):
        row = issuance(i).to_entry(i, prev)
        rows.append(row)
        prev = row.row_hash
    return rows


def test_a_huge_gap_below_the_head_is_one_named_range() -> None:
    """Rows 3 .. 10**12 - 1 deleted (the head agrees with the last row): one problem that
    names the range and its size, not a list of a trillion sequence numbers."""
    rows = chain(2)
    far = issuance(3).to_entry(10**12, rows[-1].row_hash)
    verifier = ChainVerifier(
        head=LedgerHead(id=1, last_sequence=far.sequence, last_hash=far.row_hash)
    )
    for row in [*rows, far]:
        verifier.feed(row)
    report = verifier.finish()
    assert not report.ok
    assert report.totals == {ProblemKind.MISSING: 1}
    (gap,) = report.problems
    assert gap.rows == 10**12 - 3
    assert gap.describe() == (f"sequences 3..{10**12 - 1} ({10**12 - 3} rows): missing (deleted)")


def test_each_class_lists_at_most_max_listed_and_counts_the_rest() -> None:
    rows = chain(12)
    tampered = [row.model_copy(update={"evidence": "forged"}) for row in rows[:10]]
    verifier = ChainVerifier(
        head=LedgerHead(id=1, last_sequence=11, last_hash=rows[10].row_hash), max_listed=3
    )
    for row in [*tampered, *rows[10:]]:
        verifier.feed(row)
    report = verifier.finish()
    assert report.totals == {ProblemKind.EDITED: 10, ProblemKind.PAST_HEAD: 1}
    assert [p.sequence for p in report.listed(ProblemKind.EDITED)] == [1, 2, 3]
    assert report.omitted(ProblemKind.EDITED) == 7
    assert report.listed(ProblemKind.PAST_HEAD)[0].sequence == 12
    assert report.problems_omitted == 7


def test_an_intact_chain_is_ok() -> None:
    rows = chain(5)
    verifier = ChainVerifier(head=LedgerHead(id=1, last_sequence=5, last_hash=rows[-1].row_hash))
    for row in rows:
        verifier.feed(row)
    report = verifier.finish()
    assert report.ok and report.rows_checked == 5 and report.head_sequence == 5
