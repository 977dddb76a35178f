"""Ledger appends on one held database connection, for the CA's ledger writer thread.

Every certificate waits for its ledger row's COMMIT, so the append is on the issuance
path. Through a SQLAlchemy session or ``Connection`` it costs twice the CPU of the
database's own work (pool checkout, PostgreSQL's pre-ping round trip, events, result
objects); here the driver's connection (``sqlite3`` or psycopg) is checked out once and
held, and each batch is four driver calls: lock and read the head, insert the rows (one
``executemany``), move the head, commit; on PostgreSQL the last three go in one round trip
(pipeline mode), so a batch costs two round trips while it holds the head's row lock.
What reaches the database is what :meth:`Store.append_issuances` writes: the same
statements, compiled once for the dialect, with the same bind processors
(:mod:`._prepared`), and the same serialisation
(the SQLite writer lock, then ``BEGIN IMMEDIATE``; ``SELECT ... FOR UPDATE`` of the
``ledger_head`` row on PostgreSQL).

A driver error is turned into the same :class:`~meshca.errors.StoreError` (and reason) as
the session path gives. The connection is dropped after an error that may have broken it
and a new one is opened for the next batch. A batch that fails before its COMMIT was sent
on a connection that had been idle (a restarted PostgreSQL closed it meanwhile) is tried
once more on a fresh connection: nothing of it can have been written. A failure during
COMMIT is never retried, since the rows may be in the ledger already.

One thread appends at a time (the ledger writer's); :meth:`close` may come from any
thread (:meth:`Store.close` calls it).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from meshca.errors import StoreError
from meshca.store._prepared import LedgerAppend
from meshca.store.chain import LedgerRow, NewIssuance, extend_chain
from meshca.store.engine import redact, wrap_error

HEAD_ID = 1
_WHAT = "appending to the ledger"


class _BeforeCommitError(Exception):
    """Marks a driver error raised before COMMIT was sent (safe to retry)."""

    def __init__(self, orig: BaseException) -> None:
        super().__init__(str(orig))
        self.orig = orig


class LedgerAppender:
    """Appends ledger rows in one transaction per call, on a connection it holds."""

    def __init__(
        self,
        engine: Engine,
        url: URL,
        write_lock: contextlib.AbstractContextManager[None],
        statements: LedgerAppend,
    ) -> None:
        self._engine = engine
        self._url = url
        self._lock = write_lock
        self._statements = statements
        self._sqlite = engine.dialect.name == "sqlite"
        self._dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._proxy: Any = None  # SQLAlchemy's pooled wrapper of the held connection
        self._closed = False
        self._use_lock = threading.Lock()
        self.connections_opened = 0

    def append(self, entries: Sequence[NewIssuance]) -> list[LedgerRow]:
        """Append ``entries`` in order, in one transaction; returns once it is committed.

        Raises StoreError (reason ``integrity_error`` when a row breaks a constraint, a
        duplicate request id; ``ledger_corrupt`` without a ``ledger_head`` row;
        ``database_unavailable`` / ``database_error`` otherwise).
        """
        if not entries:
            return []
        with self._use_lock:
            try:
                return self._append(entries)
            finally:
                if self._closed:
                    self._release()

    def _append(self, entries: Sequence[NewIssuance]) -> list[LedgerRow]:
        fresh = self._proxy is None
        try:
            return self._append_once(entries)
        except _BeforeCommitError as exc:
            self._drop()
            if fresh or not self._is_disconnect(exc.orig):
                raise self._wrap(exc.orig) from None
        except StoreError:
            raise
        except BaseException as exc:
            if isinstance(exc, self._dbapi_error):
                self._drop()
                raise self._wrap(exc) from None
            raise
        # The held connection had gone stale while idle: once more on a new one.
        try:
            return self._append_once(entries)
        except _BeforeCommitError as exc:
            self._drop()
            raise self._wrap(exc.orig) from None
        except BaseException as exc:
            if isinstance(exc, self._dbapi_error):
                self._drop()
                raise self._wrap(exc) from None
            raise

    def _append_once(self, entries: Sequence[NewIssuance]) -> list[LedgerRow]:
        conn = self._connection()
        statements = self._statements
        with self._lock:
            cursor = conn.cursor()
            committing = False
            try:
                if self._sqlite:
                    cursor.execute("BEGIN IMMEDIATE")
                cursor.execute(
                    statements.read_head.sql, statements.read_head.parameters({"head_id": HEAD_ID})
                )
                rows = extend_chain(cursor.fetchone(), entries, redact(self._url))
                insert = statements.insert_rows
                values = [insert.parameters(r.columns()) for r in rows]
                move = statements.move_head.parameters(
                    {
                        "head_id": HEAD_ID,
                        "new_sequence": rows[-1].sequence,
                        "new_hash": rows[-1].row_hash,
                    }
                )
                if self._sqlite:
                    cursor.executemany(insert.sql, values)
                    cursor.execute(statements.move_head.sql, move)
                    committing = True
                    cursor.execute("COMMIT")
                else:
                    # The rows, the head and COMMIT in one round trip (psycopg's pipeline
                    # mode): the head's row lock is held for one round trip less per
                    # statement, and every other writer waits for that lock.
                    committing = True
                    with conn.pipeline():
                        cursor.executemany(insert.sql, values)
                        cursor.execute(statements.move_head.sql, move)
                        conn.commit()
                return rows
            except BaseException as exc:
                self._rollback(conn)
                if not committing and isinstance(exc, self._dbapi_error):
                    raise _BeforeCommitError(exc) from exc
                raise
            finally:
                with contextlib.suppress(BaseException):
                    cursor.close()

    def _connection(self) -> Any:
        if self._closed:
            raise StoreError(
                f"{_WHAT} on {redact(self._url)} failed: the store is closed",
                reason="store_closed",
            )
        if self._proxy is None:
            try:
                self._proxy = self._engine.raw_connection()
            except SQLAlchemyError as exc:
                raise wrap_error(_WHAT, exc, self._url) from exc
            self.connections_opened += 1
        return self._proxy.driver_connection

    def _rollback(self, conn: Any) -> None:
        with contextlib.suppress(BaseException):
            if self._sqlite:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            else:
                conn.rollback()

    def _is_disconnect(self, orig: BaseException) -> bool:
        wrapped = self._as_sqlalchemy(orig)
        return isinstance(wrapped, OperationalError | InterfaceError)

    def _as_sqlalchemy(self, orig: BaseException) -> SQLAlchemyError:
        """The SQLAlchemy exception the session path would have raised for ``orig``."""
        wrapped = DBAPIError.instance(
            None,
            None,
            orig,
            self._dbapi_error,
            dialect=self._engine.dialect,
        )
        return wrapped if isinstance(wrapped, SQLAlchemyError) else DBAPIError(None, None, orig)

    def _wrap(self, orig: BaseException) -> StoreError:
        return wrap_error(_WHAT, self._as_sqlalchemy(orig), self._url)

    def _drop(self) -> None:
        """Forget the held connection (closing it); the next append opens a new one."""
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            with contextlib.suppress(BaseException):
                proxy.invalidate()

    def close(self) -> None:
        """Give the held connection back; later appends raise StoreError(store_closed).

        During an append (another thread), the appending thread gives it back when done.
        """
        self._closed = True
        if self._use_lock.acquire(blocking=False):
            try:
                self._release()
            finally:
                self._use_lock.release()

    def _release(self) -> None:
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            with contextlib.suppress(BaseException):
                proxy.close()
