"""Engines for SQLite and PostgreSQL, and turning driver errors into StoreError.

SQLite (the one-machine default) gets WAL journaling so readers never block the writer,
``foreign_keys=ON``, a busy timeout so concurrent writers wait instead of failing, and
SQLAlchemy-controlled ``BEGIN``: Python's sqlite3 module would otherwise start
transactions late (or never, for DDL). A write transaction asks for ``BEGIN IMMEDIATE``
through the ``sqlite_begin`` execution option, taking the database's write lock before
it reads, which is what serialises ledger appends across processes.

PostgreSQL goes through psycopg 3 (``postgresql+psycopg://``; a bare ``postgresql://``
or ``postgres://`` URL is read as psycopg too), with a connect timeout and pre-ping so a
restarted server does not fail the first request after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import ConnectionPoolEntry

from meshca.errors import StoreError
from meshca.statedir import MESHCA_NAMES, ensure_private_dir, ensure_private_file, user_name

SQLITE_BUSY_TIMEOUT_SECONDS = 30
POSTGRES_CONNECT_TIMEOUT_SECONDS = 10
POSTGRES_STATEMENT_TIMEOUT_MS = 30_000
POSTGRES_LOCK_TIMEOUT_MS = 15_000
SQLITE_BEGIN_OPTION = "sqlite_begin"


def parse_url(url: str) -> URL:
    """Parse a database URL, choosing psycopg 3 for PostgreSQL; raise StoreError if invalid."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        # The message would echo the URL, password included: say only what is wrong.
        raise StoreError(
            "database URL is not a valid SQLAlchemy URL (expected e.g. "
            "sqlite:///path/meshca.db or postgresql+psycopg://user@host/db)",
            reason="invalid_database_url",
        ) from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def redact(url: URL) -> str:
    """The URL as text with any password replaced by ``***``."""
    return url.render_as_string(hide_password=True)


def _sqlite_file(url: URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
"""Files SQLite keeps beside the database; it creates them with the database's mode."""


def _prepare_sqlite_file(path: Path) -> None:
    """Make the database's directory private (0700) and the database file 0600, both
    meshca's, whatever the umask; refuse files another user owns (see meshca.statedir).

    The database is created here, empty, before SQLite opens it: SQLite would create it
    with 0666 less the umask, and gives its -wal and -shm files the database's mode."""
    ensure_private_dir(
        path.parent,
        error=StoreError,
        what="database directory",
        own_names=(*MESHCA_NAMES, path.name),
    )
    ensure_private_file(path, error=StoreError, what="database file")
    ensure_private_file(_lock_file(path), error=StoreError, what="database lock file")
    for suffix in SQLITE_SIDE_FILES:
        side = path.with_name(path.name + suffix)
        ensure_private_file(side, error=StoreError, what="database file", create=False)


def _lock_file(database: Path) -> Path:
    return database.with_name(database.name + ".write-lock")


def _enable_wal(cursor: sqlite3.Cursor) -> None:
    """Switch the database file to WAL (persistent; a no-op once done).

    The switch needs an exclusive lock and SQLite does not run the busy handler for it,
    so processes opening a brand-new file together retry here instead of failing.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_SECONDS
    while True:
        try:
            (mode,) = cursor.execute("PRAGMA journal_mode").fetchone()
            if str(mode).lower() != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _on_sqlite_connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
    # Hand transaction control to SQLAlchemy (see _on_sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
        cursor.execute("PRAGMA foreign_keys = ON")
        _enable_wal(cursor)
        # FULL: every commit fsyncs the WAL, so a returned certificate's ledger row
        # survives a power loss (NORMAL would only survive a process crash).
        cursor.execute("PRAGMA synchronous = FULL")
    finally:
        cursor.close()


def _on_sqlite_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


class SqliteWriterLock:
    """Serialises SQLite writers across threads and processes without polling.

    SQLite's own busy handler retries a locked database by sleeping in growing steps, so
    several worker processes appending to one ledger spend their time asleep. A blocking
    ``flock`` on a lock file beside the database queues them in the kernel instead: the
    next writer wakes as soon as the previous one commits. (A thread lock first, because
    ``flock`` does not exclude threads sharing one open file.)
    """

    def __init__(self, database: Path) -> None:
        self._path = _lock_file(database)
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


def writer_lock(url: URL) -> contextlib.AbstractContextManager[None]:
    """The lock write transactions take first: a file lock for a SQLite file, else none
    (PostgreSQL serialises ledger appends with ``SELECT ... FOR UPDATE``)."""
    path = _sqlite_file(url) if url.get_backend_name() == "sqlite" else None
    return SqliteWriterLock(path) if path is not None else contextlib.nullcontext()


def make_engine(url: URL, *, echo: bool = False) -> Engine:
    """Create the engine for ``url``; for a SQLite file, create its directory first."""
    try:
        if url.get_backend_name() == "sqlite":
            path = _sqlite_file(url)
            if path is not None:
                _prepare_sqlite_file(path)
            engine = create_engine(
                url,
                echo=echo,
                # A local file: no connection can go stale, so no ping per checkout.
                pool_pre_ping=False,
                connect_args={
                    "timeout": SQLITE_BUSY_TIMEOUT_SECONDS,
                    "check_same_thread": False,
                },
            )
            event.listen(engine, "connect", _on_sqlite_connect)
            event.listen(engine, "begin", _on_sqlite_begin)
            return engine
        connect_args: dict[str, object] = {}
        if url.get_backend_name() == "postgresql":
            connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_SECONDS
            # Bound every statement and lock wait: a replica stalled inside a ledger
            # transaction must not hold every other replica's appends forever.
            connect_args["options"] = (
                f"-c statement_timeout={POSTGRES_STATEMENT_TIMEOUT_MS} "
                f"-c lock_timeout={POSTGRES_LOCK_TIMEOUT_MS}"
            )
        return create_engine(url, echo=echo, pool_pre_ping=True, connect_args=connect_args)
    except (NoSuchModuleError, ArgumentError, ImportError) as exc:
        raise StoreError(
            f"cannot use database {redact(url)}: {exc}; supported: sqlite:///<path>, "
            "postgresql+psycopg://user[:password]@host[:port]/db",
            reason="invalid_database_url",
        ) from exc
    except OSError as exc:
        raise StoreError(
            f"cannot create the directory for database {redact(url)}: {exc.strerror}",
            reason="database_unavailable",
        ) from exc


def _on_sqlite_read_only_connect(
    dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry
) -> None:
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
        cursor.execute("PRAGMA query_only = ON")
    finally:
        cursor.close()


def make_read_only_engine(url: URL) -> Engine:
    """An engine that can only read ``url``: for audits and status, never for the CA.

    A SQLite file must exist already (nothing is created, not even its directory) and is
    opened with ``mode=ro``; PostgreSQL sessions get ``default_transaction_read_only``.
    Raises StoreError(reason="database_missing") when the SQLite file is not there.
    """
    if url.get_backend_name() != "sqlite":
        engine = make_engine(url)
        if url.get_backend_name() == "postgresql":
            event.listen(engine, "connect", _on_postgres_read_only_connect)
        return engine
    path = _sqlite_file(url)
    if path is None:
        raise StoreError(
            f"a read-only open needs a SQLite database file, not {redact(url)}",
            reason="invalid_database_url",
        )
    if not path.is_file():
        raise StoreError(
            f"no meshca database at {path} (check --state-dir / --database-url)",
            reason="database_missing",
        )
    uri = f"file:{quote(str(path.resolve()))}"
    read_only = url.set(database=uri, query={"mode": "ro", "uri": "true"})
    engine = create_engine(
        read_only,
        pool_pre_ping=False,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
    )
    event.listen(engine, "connect", _on_sqlite_read_only_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def _on_postgres_read_only_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    dbapi_connection.commit()


def _detail(exc: BaseException, url: URL) -> str:
    """A one-line description of a driver error, without SQL, parameters or password."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    text = "; ".join(lines[:3]) or type(cause).__name__
    if url.password:
        text = text.replace(str(url.password), "***")
    return f"{type(cause).__name__}: {text}"


def wrap_error(what: str, exc: SQLAlchemyError, url: URL) -> StoreError:
    """StoreError for ``exc``, raised while doing ``what`` (e.g. "appending to the ledger")."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError):
        reason = "database_unavailable"
    elif isinstance(exc, IntegrityError):
        reason = "integrity_error"
    else:
        reason = "database_error"
    detail = _detail(exc, url)
    path = _sqlite_file(url) if url.get_backend_name() == "sqlite" else None
    if path is not None and "unable to open database file" in detail:
        detail += (
            f" (check that {path.parent} and the {path.name}* files in it are owned, readable "
            f"and writable by {user_name(os.geteuid())}, which meshca runs as)"
        )
    return StoreError(f"{what} failed on {redact(url)}: {detail}", reason=reason)
