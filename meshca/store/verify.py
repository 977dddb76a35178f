"""Checking the ledger's hash chain, one row at a time.

:class:`ChainVerifier` is fed rows in ascending ``sequence`` order (the store streams
them in batches, so memory stays bounded however long the ledger is) and sorts every
break into one of the classes of :class:`ProblemKind`:

- ``edited``: a row whose ``row_hash`` does not match its contents (edited, or moved
  to another sequence number: the sequence is hashed);
- ``broken-link``: a row whose ``prev_hash`` is not the previous row's ``row_hash``
  (rows reordered, or the previous row edited and its hash recomputed);
- ``missing``: a gap in the sequence numbers below the head (rows deleted), named as
  one range however many rows it spans;
- ``truncated``: ``ledger_head`` records more rows than the ledger holds (rows deleted
  from the end), also one range;
- ``past-head``: a row whose sequence lies beyond ``ledger_head`` (inserted outside
  meshca, which always moves the head with the row); the numbers between the head and
  such a row were never used, so they are not reported as missing;
- ``bad-sequence``: a row numbered 0 or below (inserted: meshca starts at 1);
- ``head-mismatch``: the last row's hash differs from ``ledger_head.last_hash``;
- ``head-missing`` / ``head-invalid``: the ``ledger_head`` row is gone or inconsistent.

Sequence numbers are the table's primary key, so duplicates cannot occur. Each class
lists its first ``max_listed`` problems, naming the row (sequence and serial) and
counting the rest, so a flood of one kind never hides another.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

from meshca.store.chain import GENESIS_HASH, row_hash
from meshca.store.models import LedgerEntry, LedgerHead

DEFAULT_MAX_LISTED = 20
"""Problems listed per class; the rest of that class are counted."""


class ProblemKind(enum.StrEnum):
    """The classes of chain breaks, in the order reports show them."""

    PAST_HEAD = "past-head"
    BAD_SEQUENCE = "bad-sequence"
    EDITED = "edited"
    BROKEN_LINK = "broken-link"
    MISSING = "missing"
    TRUNCATED = "truncated"
    HEAD_MISMATCH = "head-mismatch"
    HEAD_MISSING = "head-missing"
    HEAD_INVALID = "head-invalid"


@dataclass(frozen=True, slots=True)
class LedgerProblem:
    """One break in the chain.

    ``sequence`` is the row (0 for the ``ledger_head`` row itself); for ``missing`` and
    ``truncated``, the first of the absent sequences, ``last_sequence`` the last.
    ``serial_hex`` is the row's certificate serial where a row is there to name.
    """

    kind: ProblemKind
    sequence: int
    problem: str
    serial_hex: str | None = None
    last_sequence: int | None = None

    @property
    def rows(self) -> int:
        """How many sequence numbers the problem covers (1 unless it is a range)."""
        return 1 if self.last_sequence is None else self.last_sequence - self.sequence + 1

    def describe(self) -> str:
        """One line naming the row or range, for terminals."""
        if self.last_sequence is not None and self.last_sequence != self.sequence:
            where = f"sequences {self.sequence}..{self.last_sequence} ({self.rows} rows)"
        elif self.sequence == 0 and self.kind.value.startswith("head"):
            where = "ledger_head"
        else:
            where = f"sequence {self.sequence}"
        if self.serial_hex is not None:
            where += f" (serial {self.serial_hex})"
        return f"{where}: {self.problem}"


@dataclass(frozen=True, slots=True)
class LedgerReport:
    """The outcome of :meth:`meshca.store.Store.verify_ledger`.

    ``head_sequence`` is what ``ledger_head`` records (0 if it is missing). ``totals``
    counts the problems found per class, ``problems`` lists at most ``max_listed`` of
    each class; ``problems_omitted`` is how many were found but not listed.
    """

    rows_checked: int
    problems: tuple[LedgerProblem, ...]
    head_sequence: int
    totals: dict[ProblemKind, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.totals.values()) and not self.problems

    @property
    def problems_omitted(self) -> int:
        return sum(self.totals.values()) - len(self.problems)

    @property
    def problem_sequences(self) -> frozenset[int]:
        """The first sequence number of every listed problem."""
        return frozenset(p.sequence for p in self.problems)

    def listed(self, kind: ProblemKind) -> tuple[LedgerProblem, ...]:
        return tuple(p for p in self.problems if p.kind is kind)

    def omitted(self, kind: ProblemKind) -> int:
        return self.totals.get(kind, 0) - len(self.listed(kind))


@dataclass(slots=True)
class ChainVerifier:
    """Accumulates problems while rows are fed in ascending sequence order."""

    head: LedgerHead | None
    max_listed: int = DEFAULT_MAX_LISTED
    rows_checked: int = 0
    _problems: list[LedgerProblem] = field(default_factory=list)
    _totals: Counter[ProblemKind] = field(default_factory=Counter)
    _expected: int = 1
    _last_sequence: int = 0
    _prev_hash: str | None = GENESIS_HASH

    def _report(self, problem: LedgerProblem) -> None:
        self._totals[problem.kind] += 1
        if self._totals[problem.kind] <= self.max_listed:
            self._problems.append(problem)

    def feed(self, entry: LedgerEntry) -> None:
        """Check one row; rows must come in ascending ``sequence`` order."""
        self.rows_checked += 1
        seq, serial = entry.sequence, entry.serial_hex
        head = self.head
        if seq < 1:
            self._report(
                LedgerProblem(
                    ProblemKind.BAD_SEQUENCE,
                    seq,
                    f"sequence {seq} is not positive: inserted outside meshca",
                    serial,
                )
            )
            return
        if head is not None and seq > head.last_sequence:
            # meshca moves the head with every row, so this row was never appended by it.
            # Checked apart from the chain: the numbers in between were never used.
            self._report(
                LedgerProblem(
                    ProblemKind.PAST_HEAD,
                    seq,
                    f"lies past the chain's head {head.last_sequence}: inserted outside meshca",
                    serial,
                )
            )
            return
        if seq > self._expected:
            self._report(
                LedgerProblem(
                    ProblemKind.MISSING,
                    self._expected,
                    "missing (deleted)",
                    last_sequence=seq - 1,
                )
            )
            self._prev_hash = None  # the predecessor is gone; its link cannot be checked
        self._expected = seq + 1
        self._last_sequence = seq

        if row_hash(entry) != entry.row_hash:
            self._report(
                LedgerProblem(
                    ProblemKind.EDITED,
                    seq,
                    "row hash does not match its contents (edited, or moved from another sequence)",
                    serial,
                )
            )
        if seq == 1 and entry.prev_hash != GENESIS_HASH:
            self._report(
                LedgerProblem(
                    ProblemKind.BROKEN_LINK,
                    seq,
                    "prev_hash of the first row is not the genesis value (edited)",
                    serial,
                )
            )
        elif seq > 1 and self._prev_hash is not None and entry.prev_hash != self._prev_hash:
            self._report(
                LedgerProblem(
                    ProblemKind.BROKEN_LINK,
                    seq,
                    f"prev_hash does not match row {seq - 1} (reordered, or row {seq - 1} "
                    "was edited and its hash recomputed)",
                    serial,
                )
            )
        if head is not None and seq == head.last_sequence and entry.row_hash != head.last_hash:
            self._report(
                LedgerProblem(
                    ProblemKind.HEAD_MISMATCH,
                    seq,
                    "row hash differs from ledger_head.last_hash (last row replaced, or "
                    "ledger_head edited)",
                    serial,
                )
            )
        self._prev_hash = entry.row_hash

    def finish(self) -> LedgerReport:
        """Apply the ``ledger_head`` checks that need the whole ledger, and report."""
        head = self.head
        if head is None:
            self._report(
                LedgerProblem(ProblemKind.HEAD_MISSING, 0, "ledger_head row is missing (deleted)")
            )
        elif self._last_sequence < head.last_sequence:
            self._report(
                LedgerProblem(
                    ProblemKind.TRUNCATED,
                    self._last_sequence + 1,
                    f"missing (deleted from the end: ledger_head records sequence "
                    f"{head.last_sequence} but the ledger ends at {self._last_sequence})",
                    last_sequence=head.last_sequence,
                )
            )
        elif head.last_sequence == 0 and head.last_hash != GENESIS_HASH:
            self._report(
                LedgerProblem(
                    ProblemKind.HEAD_INVALID,
                    0,
                    "ledger_head is empty but its last_hash is not the genesis value",
                )
            )
        order = list(ProblemKind)
        return LedgerReport(
            rows_checked=self.rows_checked,
            problems=tuple(sorted(self._problems, key=lambda p: (order.index(p.kind), p.sequence))),
            head_sequence=head.last_sequence if head is not None else 0,
            totals=dict(self._totals),
        )
