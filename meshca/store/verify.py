"""Checking the ledger's hash chain, one row at a time.

:class:`ChainVerifier` is fed rows in ascending ``sequence`` order (the store streams
them in batches, so memory stays bounded however long the ledger is) and names every
sequence number where the chain breaks:

- a row whose ``row_hash`` does not match its contents: edited, or moved to another
  sequence number (the sequence is hashed);
- a gap in the sequence numbers: rows deleted;
- a row whose ``prev_hash`` is not the previous row's ``row_hash``: rows reordered, or
  the previous row edited and its hash recomputed;
- against ``ledger_head``: rows missing from the end (tail truncated), rows past the
  head (inserted), or a last row whose hash differs from the head's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshca.store.chain import GENESIS_HASH, row_hash
from meshca.store.models import LedgerEntry, LedgerHead

DEFAULT_MAX_PROBLEMS = 1000


@dataclass(frozen=True, slots=True)
class LedgerProblem:
    """One break in the chain, at ``sequence`` (0 for the ``ledger_head`` row itself)."""

    sequence: int
    problem: str


@dataclass(frozen=True, slots=True)
class LedgerReport:
    """The outcome of :meth:`meshca.store.Store.verify_ledger`.

    ``head_sequence`` is what ``ledger_head`` records (0 if it is missing);
    ``problems_omitted`` counts problems found past the listing limit.
    """

    rows_checked: int
    problems: tuple[LedgerProblem, ...]
    head_sequence: int
    problems_omitted: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and self.problems_omitted == 0

    @property
    def problem_sequences(self) -> frozenset[int]:
        """Every sequence number named by a listed problem."""
        return frozenset(p.sequence for p in self.problems)


@dataclass(slots=True)
class ChainVerifier:
    """Accumulates problems while rows are fed in ascending sequence order."""

    head: LedgerHead | None
    max_problems: int = DEFAULT_MAX_PROBLEMS
    rows_checked: int = 0
    _problems: list[LedgerProblem] = field(default_factory=list)
    _omitted: int = 0
    _expected: int = 1
    _last_sequence: int = 0
    _prev_hash: str | None = GENESIS_HASH

    def _report(self, sequence: int, problem: str) -> None:
        if len(self._problems) < self.max_problems:
            self._problems.append(LedgerProblem(sequence, problem))
        else:
            self._omitted += 1

    def _report_missing(self, first: int, last: int, why: str) -> None:
        """Name each missing sequence in ``first..last`` without looping past the limit."""
        room = max(self.max_problems - len(self._problems), 0)
        shown_last = min(last, first + room - 1)
        for sequence in range(first, shown_last + 1):
            self._report(sequence, why)
        self._omitted += last - max(shown_last, first - 1)

    def feed(self, entry: LedgerEntry) -> None:
        """Check one row; rows must come in ascending ``sequence`` order."""
        self.rows_checked += 1
        seq = entry.sequence
        if seq < 1:
            self._report(seq, f"sequence {seq} is not positive (inserted)")
            return
        if seq > self._expected:
            self._report_missing(self._expected, seq - 1, "missing (deleted)")
            self._prev_hash = None  # the predecessor is gone; its link cannot be checked
        self._expected = seq + 1
        self._last_sequence = seq

        if row_hash(entry) != entry.row_hash:
            self._report(
                seq, "row hash does not match its contents (edited, or moved from another sequence)"
            )
        if seq == 1 and entry.prev_hash != GENESIS_HASH:
            self._report(seq, "prev_hash of the first row is not the genesis value (edited)")
        elif seq > 1 and self._prev_hash is not None and entry.prev_hash != self._prev_hash:
            self._report(
                seq,
                f"prev_hash does not match row {seq - 1} (reordered, or row {seq - 1} "
                "was edited and its hash recomputed)",
            )
        if self.head is not None:
            if seq > self.head.last_sequence:
                self._report(
                    seq,
                    f"row is past ledger_head's last sequence {self.head.last_sequence} "
                    "(inserted without the head being updated)",
                )
            elif seq == self.head.last_sequence and entry.row_hash != self.head.last_hash:
                self._report(
                    seq,
                    "row hash differs from ledger_head.last_hash "
                    "(last row replaced, or ledger_head edited)",
                )
        self._prev_hash = entry.row_hash

    def finish(self) -> LedgerReport:
        """Apply the ``ledger_head`` checks that need the whole ledger, and report."""
        head = self.head
        if head is None:
            self._report(0, "ledger_head row is missing (deleted)")
        elif self._last_sequence < head.last_sequence:
            self._report_missing(
                self._last_sequence + 1,
                head.last_sequence,
                f"missing (deleted from the end: ledger_head records sequence "
                f"{head.last_sequence} but the ledger ends at {self._last_sequence})",
            )
        elif head.last_sequence == 0 and head.last_hash != GENESIS_HASH:
            self._report(0, "ledger_head is empty but its last_hash is not the genesis value")
        return LedgerReport(
            rows_checked=self.rows_checked,
            problems=tuple(self._problems),
            head_sequence=head.last_sequence if head is not None else 0,
            problems_omitted=self._omitted,
        )
