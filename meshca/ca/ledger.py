"""Group commit for the issuance ledger.

Every certificate is returned only after its ledger row is committed, and a commit on a
durable database costs an fsync. Concurrent issuances therefore share transactions: while
one batch is being committed, new rows queue up, and the next commit takes them all (the
same idea as PostgreSQL's group commit). Under light load a batch is one row and nothing
waits; under heavy load one fsync covers many certificates.

Logging: a failed commit is logged here, once per batch (the operator's database needs
attention); a row refused alone for a duplicate request id is not, since it is the normal
end of two concurrent retries of one request, and the caller answers it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from meshca.errors import StoreError
from meshca.store import LedgerRow, NewIssuance, Store

log = logging.getLogger(__name__)

MAX_BATCH = 256


@dataclass
class _Pending:
    entry: NewIssuance
    done: asyncio.Future[LedgerRow] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class LedgerWriter:
    """Appends ledger rows in batches; ``append`` returns once its row is durable."""

    def __init__(self, store: Store, *, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._max_batch = max_batch
        self._queue: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0
        self.rows = 0

    async def append(self, entry: NewIssuance) -> LedgerRow:
        pending = _Pending(entry)
        self._queue.append(pending)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await asyncio.shield(pending.done)

    async def _flush(self) -> None:
        while self._queue:
            batch = self._queue[: self._max_batch]
            del self._queue[: len(batch)]
            await self._commit(batch)

    @staticmethod
    def _fail(batch: list[_Pending], exc: BaseException) -> None:
        for pending in batch:
            if not pending.done.done():
                pending.done.set_exception(exc)
                # Its caller may have given up (its deadline passed) and will never read
                # the outcome: mark it read now, or asyncio reports "exception was never
                # retrieved". A caller still waiting gets it all the same (shield passes
                # it on); a callback doing this later may never run if the loop stops.
                pending.done.exception()

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            rows = await asyncio.to_thread(self._store.append_issuances, [p.entry for p in batch])
        except StoreError as exc:
            if len(batch) > 1 and exc.reason == "integrity_error":
                # One row broke a constraint (a duplicate request id); commit the others.
                for pending in batch:
                    await self._commit([pending])
                return
            if not (exc.reason == "integrity_error" and batch[0].entry.request_id is not None):
                log.error(
                    "ledger write failed; %d certificate(s) withheld (serial %s%s): %s",
                    len(batch),
                    batch[0].entry.serial_hex,
                    ", ..." if len(batch) > 1 else "",
                    exc.message,
                )
            self._fail(batch, exc)
            return
        except Exception as exc:
            # Anything else is a bug, but every waiting request must still get an answer.
            log.exception("ledger batch of %d rows failed unexpectedly", len(batch))
            self._fail(batch, StoreError(f"ledger write failed: {exc}", reason="ledger_error"))
            return
        self.batches += 1
        self.rows += len(rows)
        for pending, row in zip(batch, rows, strict=True):
            if not pending.done.done():
                pending.done.set_result(row)
