"""Could a ledger append succeed now? The cheap check behind ``/readyz``.

``SELECT 1`` only proves that the database answers. An append also needs the schema at
the revision this meshca migrates to, a database that accepts writes, the ledger head
row present and lockable within a short bound, and (for a SQLite file) room on the disk
for the row and its WAL. The check runs the append's own first and last statements in a
write transaction (lock and read the head; "move" it to where it already is) and rolls
back, so it writes nothing and leaves no trace in the ledger.

PostgreSQL's free space is the server's business and is not checked here: a full disk
there makes the write transaction fail, which the check reports.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import SQLAlchemyError

from meshca.store import migrate
from meshca.store._prepared import LedgerAppend
from meshca.store.engine import (
    SQLITE_BEGIN_OPTION,
    SQLITE_BUSY_TIMEOUT_SECONDS,
    wrap_error,
)

LOCK_TIMEOUT_SECONDS = 1.0
"""How long the check waits for the ledger head's write lock before calling it held."""
MIN_FREE_BYTES = 64 * 1024 * 1024
"""Free space a SQLite ledger's file system must keep (rows, WAL, checkpoints)."""


@functools.cache
def _head_revision() -> str | None:
    return migrate.head_revision()


def ledger_problems(
    engine: Engine,
    url: URL,
    append: LedgerAppend,
    head_id: int,
    *,
    lock_timeout: float = LOCK_TIMEOUT_SECONDS,
    min_free_bytes: int = MIN_FREE_BYTES,
) -> list[str]:
    """Every reason an append to the ledger could not succeed now; empty when it could."""
    problems: list[str] = []
    path = _sqlite_path(url)
    if path is not None:
        problems.extend(_free_space_problem(path, min_free_bytes))
    try:
        with engine.connect() as conn:
            revision = _current_revision(conn)
            conn.rollback()
            expected = _head_revision()
            if revision != expected:
                found = f"at revision {revision}" if revision else "missing (no alembic_version)"
                problems.append(
                    f"schema: {found}, this meshca needs {expected} "
                    "(run `meshca admin db upgrade`, or restore the database)"
                )
                return problems
            problems.extend(_lock_head(conn, url, append, head_id, lock_timeout))
    except SQLAlchemyError as exc:
        problems.append(wrap_error("checking the ledger", exc, url).message)
    return problems


def _current_revision(conn: Connection) -> str | None:
    """The schema revision, read directly: Alembic's MigrationContext would log two
    INFO lines per probe."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _lock_head(
    conn: Connection, url: URL, append: LedgerAppend, head_id: int, lock_timeout: float
) -> list[str]:
    """Lock the head as an append does, touch it, roll back; waits at most ``lock_timeout``."""
    millis = max(1, int(lock_timeout * 1000))
    sqlite = conn.dialect.name == "sqlite"
    raw = conn.connection.driver_connection if sqlite else None
    try:
        if raw is not None:
            raw.execute(f"PRAGMA busy_timeout = {millis}")
            conn.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
        with conn.begin() as transaction:
            if conn.dialect.name == "postgresql":
                # Transaction-local: the pooled connection keeps the store's own bound.
                conn.execute(
                    text("SELECT set_config('lock_timeout', :ms, true)"), {"ms": f"{millis}ms"}
                )
            head = append.read_head.execute(conn, {"head_id": head_id}).first()
            if head is None:
                return [
                    "ledger head: the ledger_head row is missing; the ledger cannot be "
                    "extended (run `meshca admin ledger verify`)"
                ]
            append.move_head.execute(
                conn, {"head_id": head_id, "new_sequence": head[0], "new_hash": head[1]}
            )
            transaction.rollback()
    except SQLAlchemyError as exc:
        detail = wrap_error("locking the ledger head", exc, url).message
        if _is_lock_timeout(exc):
            return [f"ledger head: held by another writer for over {lock_timeout:g}s: {detail}"]
        return [f"ledger head: not writable: {detail}"]
    finally:
        if raw is not None:
            raw.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
    return []


def _is_lock_timeout(exc: SQLAlchemyError) -> bool:
    text_ = str(getattr(exc, "orig", exc)).lower()
    return "locked" in text_ or "lock timeout" in text_ or "could not obtain lock" in text_


def _sqlite_path(url: URL) -> Path | None:
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None
    return Path(database)


def _free_space_problem(path: Path, min_free_bytes: int) -> list[str]:
    try:
        stats = os.statvfs(path.parent)
    except OSError as exc:
        return [f"disk: cannot read the free space of {path.parent}: {exc.strerror}"]
    free = stats.f_bavail * stats.f_frsize
    if free >= min_free_bytes:
        return []
    return [
        f"disk: {_mib(free)} free on the file system of {path.parent}; the ledger needs "
        f"at least {_mib(min_free_bytes)} (free space, or move the database)"
    ]


def _mib(count: int) -> str:
    return f"{count / (1024 * 1024):.1f} MiB"
