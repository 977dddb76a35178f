"""The repository: every read and write meshca makes to its database.

Methods are synchronous (async callers use ``asyncio.to_thread``) and each runs in its
own short transaction. Appends to the ledger are serialised by locking the
``ledger_head`` row (``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on
SQLite), so any number of threads, worker processes and replicas sharing one database
extend a single valid chain. Every SQLAlchemy or driver error leaves as a
:class:`~meshca.errors.StoreError` naming what failed and the database URL without its
password.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Table, delete, func, inspect, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, SQLModel, col, select

from meshca.errors import StoreError
from meshca.store import join_tokens, migrate, readiness, root_lifecycle
from meshca.store._prepared import LedgerAppend
from meshca.store._types import to_utc
from meshca.store.appender import LedgerAppender
from meshca.store.chain import LedgerRow, NewIssuance, extend_chain
from meshca.store.engine import (
    SQLITE_BEGIN_OPTION,
    make_engine,
    make_read_only_engine,
    parse_url,
    redact,
    wrap_error,
    writer_lock,
)
from meshca.store.models import (
    ROOT_BACKENDS,
    ROOT_STATES,
    IntermediateRecord,
    JoinToken,
    LedgerEntry,
    LedgerHead,
    RootRecord,
    UsedToken,
    utc_now,
)
from meshca.store.verify import ChainVerifier, LedgerReport

HEAD_ID = 1
VERIFY_BATCH_SIZE = 500
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class StoreCounts:
    """How many rows each table holds (for ``meshca admin status`` and metrics)."""

    roots: int
    intermediates: int
    issued: int


class Store:
    """meshca's database: roots, intermediates and the hash-chained issuance ledger."""

    def __init__(self, url: str, *, echo: bool = False, read_only: bool = False) -> None:
        self._url = parse_url(url)
        self._engine = (
            make_read_only_engine(self._url) if read_only else make_engine(self._url, echo=echo)
        )
        self._is_postgres = self._engine.dialect.name == "postgresql"
        self._writer = self._engine.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
        self._write_lock = writer_lock(self._url)
        # Compiled once: SQLAlchemy's per-execute statement building cost more CPU than
        # the database's own work on the issuance path.
        self._ledger_append = LedgerAppend(
            _table(LedgerEntry), _table(LedgerHead), self._engine.dialect
        )
        self._appenders: weakref.WeakSet[LedgerAppender] = weakref.WeakSet()

    @classmethod
    def open(cls, url: str) -> Store:
        """Connect and apply any pending migrations (what the server does at start-up)."""
        store = cls(url)
        try:
            store.upgrade()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open_read_only(cls, url: str) -> Store:
        """Open an existing database for reading only (``meshca admin`` audits and status).

        Never creates a file, never migrates. Raises StoreError when there is no database
        (reason ``database_missing``) or its schema is not the one this meshca reads
        (reason ``schema_not_current``), saying to run ``meshca admin db upgrade``.
        """
        store = cls(url, read_only=True)
        try:
            store.require_current_schema()
        except BaseException:
            store.close()
            raise
        return store

    def require_current_schema(self) -> None:
        """Raise StoreError unless the schema is at this meshca's newest revision."""
        current = self.current_revision()
        head = migrate.head_revision()
        where = self.redacted_url()
        if current == head:
            missing = sorted(set(SQLModel.metadata.tables) - self._table_names())
            if missing:
                raise StoreError(
                    f"the database {where} is at schema revision {head} but has no "
                    f"{', '.join(missing)} table(s): dropped outside meshca? Restore it "
                    "from a backup",
                    reason="schema_not_current",
                )
            return
        if current is None:
            problem = f"the database {where} holds no meshca schema (no schema revision)"
        elif migrate.is_known_revision(current):
            problem = f"the database {where} is at schema revision {current}, not {head}"
        else:
            raise StoreError(
                f"the database {where} is at schema revision {current}, which this meshca "
                f"does not know (its newest is {head}); was it migrated by a newer meshca?",
                reason="unknown_schema_revision",
            )
        raise StoreError(
            f"{problem}; run `meshca admin db upgrade` with the same --state-dir / "
            "--database-url (the server also migrates on start)",
            reason="schema_not_current",
        )

    def _table_names(self) -> set[str]:
        try:
            with self._engine.connect() as connection:
                return set(inspect(connection).get_table_names())
        except SQLAlchemyError as exc:
            raise wrap_error("listing the tables", exc, self._url) from exc

    def redacted_url(self) -> str:
        """The database URL with the password replaced by ``***`` (safe to log)."""
        return redact(self._url)

    def close(self) -> None:
        """Close every pooled connection, and those held by ledger appenders."""
        for appender in list(self._appenders):
            appender.close()
        self._engine.dispose()

    @contextmanager
    def _session(self, what: str, *, write: bool = False) -> Iterator[Session]:
        """A session in one transaction, committed on success; errors become StoreError."""
        try:
            with self._write_lock if write else contextlib.nullcontext():
                with Session(self._writer if write else self._engine, expire_on_commit=False) as s:
                    with s.begin():
                        yield s
        except SQLAlchemyError as exc:
            raise wrap_error(what, exc, self._url) from exc

    @contextmanager
    def _transaction(self, what: str) -> Iterator[Connection]:
        """A Core write transaction, committed on success; errors become StoreError."""
        try:
            with self._write_lock, self._writer.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise wrap_error(what, exc, self._url) from exc

    # -- schema -----------------------------------------------------------------------

    def upgrade(self) -> None:
        """Apply pending Alembic migrations; idempotent and safe to run concurrently."""
        try:
            migrate.upgrade(self._engine)
        except SQLAlchemyError as exc:
            raise wrap_error("migrating the database schema", exc, self._url) from exc

    def current_revision(self) -> str | None:
        """The schema revision the database is at (None before the first upgrade)."""
        try:
            with self._engine.connect() as connection:
                return migrate.current_revision(connection)
        except SQLAlchemyError as exc:
            raise wrap_error("reading the schema revision", exc, self._url) from exc

    def ping(self) -> None:
        """Run ``SELECT 1``; raise StoreError(reason="database_unavailable") on failure."""
        try:
            with self._engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            error = wrap_error("pinging the database", exc, self._url)
            raise StoreError(error.message, reason="database_unavailable") from exc

    def ledger_problems(
        self,
        *,
        lock_timeout: float = readiness.LOCK_TIMEOUT_SECONDS,
        min_free_bytes: int = readiness.MIN_FREE_BYTES,
    ) -> list[str]:
        """Why a ledger append could not succeed now (schema, write lock, disk); empty
        when it could. Writes nothing: see :mod:`meshca.store.readiness`."""
        return readiness.ledger_problems(
            self._engine,
            self._url,
            self._ledger_append,
            HEAD_ID,
            lock_timeout=lock_timeout,
            min_free_bytes=min_free_bytes,
        )

    # -- roots and intermediates ------------------------------------------------------

    def add_root(self, record: RootRecord) -> RootRecord:
        """Store a root. Adding an ``active`` root retires the previously active one.

        Both happen in one transaction under a lock, so there is never a moment with two
        active roots, or none, even when two replicas race.
        """
        if record.state not in ROOT_STATES:
            raise ValueError(f"root state {record.state!r}; allowed: {sorted(ROOT_STATES)}")
        if record.backend not in ROOT_BACKENDS:
            raise ValueError(f"root backend {record.backend!r}; allowed: {sorted(ROOT_BACKENDS)}")
        _check_times(
            not_before=record.not_before,
            not_after=record.not_after,
            created_at=record.created_at,
        )
        with self._session(f"adding root {record.fingerprint}", write=True) as session:
            if self._is_postgres:
                session.execute(text("LOCK TABLE roots IN SHARE ROW EXCLUSIVE MODE"))
            if record.state == "active":
                for previous in session.exec(
                    select(RootRecord).where(RootRecord.state == "active")
                ):
                    previous.state = "retired"
                session.flush()
            session.add(record)
        return record

    def active_root(self) -> RootRecord | None:
        """The root that signs new intermediates, if there is one."""
        with self._session("reading the active root") as session:
            return session.exec(select(RootRecord).where(RootRecord.state == "active")).first()

    def list_roots(self) -> list[RootRecord]:
        """Every root, oldest first (the trust bundle publishes the unexpired ones)."""
        with self._session("listing roots") as session:
            return list(session.exec(select(RootRecord).order_by(col(RootRecord.id))))

    @contextmanager
    def _roots_locked(self, what: str) -> Iterator[Session]:
        """A write transaction holding the roots lock (BEGIN IMMEDIATE on SQLite)."""
        with self._session(what, write=True) as session:
            if self._is_postgres:
                session.execute(text("LOCK TABLE roots IN SHARE ROW EXCLUSIVE MODE"))
            yield session

    def check_prepare_root(self) -> RootRecord:
        """The active root a new root would succeed; RootRefusedError if none may be prepared."""
        with self._session("checking the roots") as session:
            return root_lifecycle.check_prepare(session)

    def prepare_root(self, record: RootRecord) -> RootRecord:
        """Record ``record`` as the prepared root, checked again under the roots lock."""
        if record.state != "prepared":
            raise ValueError(f"root state {record.state!r}; allowed: 'prepared'")
        if record.backend not in ROOT_BACKENDS:
            raise ValueError(f"root backend {record.backend!r}; allowed: {sorted(ROOT_BACKENDS)}")
        _check_times(not_before=record.not_before, not_after=record.not_after)
        with self._roots_locked(f"preparing root {record.fingerprint}") as session:
            root_lifecycle.check_prepare(session)
            session.add(record)
        return record

    def activate_root(
        self, root_id: str, *, now: datetime, propagation: timedelta, force: bool
    ) -> tuple[RootRecord, RootRecord | None, bool]:
        """Prepared -> active, active -> retiring, atomically; see :mod:`.root_lifecycle`."""
        with self._roots_locked(f"activating root {root_id}") as session:
            return root_lifecycle.activate(
                session, root_id, now=now, propagation=propagation, force=force
            )

    def retire_root(
        self, root_id: str, *, now: datetime, force: bool
    ) -> tuple[RootRecord, root_lifecycle.UnderRoot]:
        """Retiring (or prepared) -> retired; see :mod:`.root_lifecycle`."""
        with self._roots_locked(f"retiring root {root_id}") as session:
            return root_lifecycle.retire(session, root_id, now=now, force=force)

    def find_root(self, root_id: str) -> RootRecord:
        """The root a fingerprint or unique prefix names; RootRefusedError otherwise."""
        with self._session("finding a root") as session:
            return root_lifecycle.find(session, root_id)

    def certificates_under_root(self, fingerprint: str, now: datetime) -> root_lifecycle.UnderRoot:
        """How many unexpired leaves chain to the root, and when the last one expires."""
        with self._session("counting certificates under a root") as session:
            return root_lifecycle.under_root(session, fingerprint, now)

    def add_intermediate(self, record: IntermediateRecord) -> IntermediateRecord:
        """Store an intermediate; its root must already be stored."""
        _check_times(
            not_before=record.not_before,
            not_after=record.not_after,
            created_at=record.created_at,
        )
        if record.last_seen_at is None:
            record.last_seen_at = record.created_at
        with self._session(f"adding intermediate {record.fingerprint}", write=True) as session:
            session.add(record)
        return record

    def heartbeat_intermediate(self, owner: str, fingerprint: str, now: datetime) -> None:
        """``owner`` signs with ``fingerprint`` as of ``now``; its other ones are retired.

        The owning process calls this from its maintenance loop, so ``last_seen_at`` tells
        an intermediate in use from one whose process has exited without a clean stop.
        """
        _check_times(now=now)
        table = _table(IntermediateRecord)
        with self._transaction(f"recording intermediate {fingerprint[:16]} in use") as conn:
            conn.execute(
                update(table).where(table.c.fingerprint == fingerprint).values(last_seen_at=now)
            )
            conn.execute(
                update(table)
                .where(
                    table.c.owner == owner,
                    table.c.fingerprint != fingerprint,
                    table.c.retired_at.is_(None),
                )
                .values(retired_at=now)
            )

    def retire_intermediates(self, owner: str, now: datetime) -> int:
        """Mark every intermediate ``owner`` still holds as retired (a clean stop)."""
        _check_times(now=now)
        table = _table(IntermediateRecord)
        with self._transaction(f"retiring the intermediates of {owner}") as conn:
            result = conn.execute(
                update(table)
                .where(table.c.owner == owner, table.c.retired_at.is_(None))
                .values(retired_at=now)
            )
            return result.rowcount

    def list_intermediates(self, *, limit: int | None = None) -> list[IntermediateRecord]:
        """Intermediates, newest first; at most ``limit`` of them."""
        statement = select(IntermediateRecord).order_by(col(IntermediateRecord.id).desc())
        if limit is not None:
            statement = statement.limit(limit)
        with self._session("listing intermediates") as session:
            return list(session.exec(statement))

    # -- the ledger ---------------------------------------------------------------------

    def append_issuance(self, entry: NewIssuance) -> LedgerRow:
        """Append one row to the ledger; returns once it is committed (durable)."""
        return self.append_issuances([entry])[0]

    def ledger_appender(self) -> LedgerAppender:
        """Ledger appends on a connection held for them (the CA's ledger writer thread):
        the same rows and serialisation as :meth:`append_issuances`, at half the CPU."""
        appender = LedgerAppender(self._engine, self._url, self._write_lock, self._ledger_append)
        self._appenders.add(appender)
        return appender

    def append_issuances(self, entries: Sequence[NewIssuance]) -> list[LedgerRow]:
        """Append several rows in one transaction (group commit), in the order given."""
        if not entries:
            return []
        statements = self._ledger_append
        with self._transaction("appending to the ledger") as conn:
            head = statements.read_head.execute(conn, {"head_id": HEAD_ID}).first()
            rows = extend_chain(head, entries, self.redacted_url())
            statements.insert_rows.execute_many(conn, [row.columns() for row in rows])
            statements.move_head.execute(
                conn,
                {
                    "head_id": HEAD_ID,
                    "new_sequence": rows[-1].sequence,
                    "new_hash": rows[-1].row_hash,
                },
            )
        return rows

    def find_by_request_id(self, request_id: str, spiffe_id: str) -> LedgerEntry | None:
        """The ledger row of ``spiffe_id``'s request ``request_id`` (an idempotent retry).

        Request ids are unique per SPIFFE ID (index ``uq_ledger_request_id``).
        """
        statement = select(LedgerEntry).where(
            LedgerEntry.request_id == request_id, LedgerEntry.spiffe_id == spiffe_id
        )
        with self._session("looking up a request id") as session:
            return session.exec(statement).first()

    def issued_certificate(self, serial_hex: str, certificate_pem: str) -> LedgerEntry | None:
        """The ledger row of exactly this certificate (same serial, same PEM), if any."""
        statement = select(LedgerEntry).where(LedgerEntry.serial_hex == serial_hex)
        with self._session("looking up an issued certificate") as session:
            for row in session.exec(statement):
                if row.certificate_pem == certificate_pem:
                    return row
        return None

    # -- one-time tokens --------------------------------------------------------------

    def record_token_use(self, token_sha256: str, method: str, expires_at: datetime) -> bool:
        """Record the use of a one-time token by its SHA-256; False if it was used before.

        Atomic across threads, processes and replicas: the insert is the check (primary
        key on the digest, ``ON CONFLICT DO NOTHING``), so of two requests racing with
        one token exactly one gets True. The row is kept until ``expires_at``.
        """
        if not _HEX_DIGEST.fullmatch(token_sha256):
            raise ValueError("token_sha256 must be 64 lowercase hex digits")
        _check_times(expires_at=expires_at)
        row = {
            "token_sha256": token_sha256,
            "method": method,
            "expires_at": expires_at,
            "used_at": utc_now(),
        }
        table = _table(UsedToken)
        dialect = self._engine.dialect.name
        statement: postgresql.Insert | sqlite.Insert
        if dialect == "postgresql":
            statement = postgresql.insert(table).values(row).on_conflict_do_nothing()
        elif dialect == "sqlite":
            statement = sqlite.insert(table).values(row).on_conflict_do_nothing()
        else:  # pragma: no cover - meshca runs on SQLite and PostgreSQL
            raise StoreError(f"one-time tokens need SQLite or PostgreSQL, not {dialect}")
        # RETURNING, not rowcount: drivers disagree on rowcount after ON CONFLICT.
        returning = statement.returning(table.c.token_sha256)
        with self._transaction("recording a token use") as conn:
            return conn.execute(returning).first() is not None

    def purge_used_tokens(self, now: datetime) -> int:
        """Delete the records of tokens that expired before ``now``; how many went."""
        _check_times(now=now)
        table = _table(UsedToken)
        with self._transaction("deleting expired token records") as conn:
            return conn.execute(delete(table).where(table.c.expires_at < now)).rowcount

    # -- join tokens ------------------------------------------------------------------

    def add_join_tokens(self, records: Sequence[JoinToken]) -> None:
        """Store new join tokens (their digests), all or none."""
        for record in records:
            if not _HEX_DIGEST.fullmatch(record.token_sha256):
                raise ValueError("token_sha256 must be 64 lowercase hex digits")
            _check_times(created_at=record.created_at, expires_at=record.expires_at)
        with self._session("creating join tokens", write=True) as session:
            session.add_all(records)

    def find_join_token(self, token_sha256: str) -> JoinToken | None:
        """The join token with this digest, whatever its state."""
        with self._session("reading a join token") as session:
            return join_tokens.find(session, token_sha256)

    def spend_join_token(self, token_sha256: str, peer: str, now: datetime) -> bool:
        """Mark the token used by ``peer`` if it is unused, unrevoked and unexpired at
        ``now``; False otherwise. Atomic across processes and replicas
        (:mod:`.join_tokens`)."""
        _check_times(now=now)
        with self._transaction("spending a join token") as conn:
            return join_tokens.spend(conn, _table(JoinToken), token_sha256, peer, now)

    def list_join_tokens(self) -> list[JoinToken]:
        """Every join token, newest first."""
        statement = select(JoinToken).order_by(col(JoinToken.created_at).desc())
        with self._session("listing join tokens") as session:
            return list(session.exec(statement))

    def revoke_join_tokens(
        self, ids: Sequence[str], spiffe_id: str | None, now: datetime
    ) -> tuple[list[JoinToken], list[JoinToken]]:
        """Revoke the unused tokens named by id prefix or SPIFFE ID; see
        :func:`.join_tokens.revoke`."""
        _check_times(now=now)
        with self._session("revoking join tokens", write=True) as session:
            return join_tokens.revoke(session, ids, spiffe_id, now)

    def get_intermediate(self, fingerprint: str) -> IntermediateRecord | None:
        statement = select(IntermediateRecord).where(IntermediateRecord.fingerprint == fingerprint)
        with self._session("reading an intermediate") as session:
            return session.exec(statement).first()

    def get_root(self, fingerprint: str) -> RootRecord | None:
        statement = select(RootRecord).where(RootRecord.fingerprint == fingerprint)
        with self._session("reading a root") as session:
            return session.exec(statement).first()

    def list_ledger(
        self,
        *,
        spiffe_id: str | None = None,
        serial_hex: str | None = None,
        since: datetime | None = None,
        methods: Sequence[str] = (),
        limit: int = 50,
    ) -> list[LedgerEntry]:
        """Ledger rows matching every filter given, newest (highest sequence) first.

        ``since`` keeps rows issued at or after it; ``methods`` keeps rows whose
        ``auth_method`` is one of them.
        """
        statement = select(LedgerEntry)
        if spiffe_id is not None:
            statement = statement.where(LedgerEntry.spiffe_id == spiffe_id)
        if serial_hex is not None:
            statement = statement.where(LedgerEntry.serial_hex == serial_hex)
        if since is not None:
            _check_times(since=since)
            statement = statement.where(col(LedgerEntry.issued_at) >= since)
        if methods:
            statement = statement.where(col(LedgerEntry.auth_method).in_(list(methods)))
        statement = statement.order_by(col(LedgerEntry.sequence).desc()).limit(limit)
        with self._session("listing ledger rows") as session:
            return list(session.exec(statement))

    def count_issued_by_method(self) -> dict[str, int]:
        """How many ledger rows each ``auth_method`` has (``ca-internal``: the CA's own)."""
        statement = select(LedgerEntry.auth_method, func.count()).group_by(
            col(LedgerEntry.auth_method)
        )
        with self._session("counting ledger rows by method") as session:
            return {method: count for method, count in session.exec(statement)}

    def verify_ledger(self) -> LedgerReport:
        """Check the whole hash chain and the head row; name every sequence that breaks.

        Rows are read in batches of ``VERIFY_BATCH_SIZE`` inside one snapshot (repeatable
        read on PostgreSQL, one read transaction on SQLite), so memory stays bounded and
        appends running meanwhile are not mistaken for tampering.
        """
        try:
            with self._engine.connect() as connection:
                if self._is_postgres:
                    connection.execution_options(isolation_level="REPEATABLE READ")
                with Session(connection) as session, session.begin():
                    head = session.get(LedgerHead, HEAD_ID)
                    if head is not None:
                        session.expunge(head)
                    verifier = ChainVerifier(head=head)
                    last = None
                    while True:
                        statement = select(LedgerEntry).order_by(col(LedgerEntry.sequence))
                        if last is not None:
                            statement = statement.where(LedgerEntry.sequence > last)
                        batch = list(session.exec(statement.limit(VERIFY_BATCH_SIZE)))
                        for row in batch:
                            verifier.feed(row)
                        if len(batch) < VERIFY_BATCH_SIZE:
                            break
                        last = batch[-1].sequence
                        session.expunge_all()
                    return verifier.finish()
        except SQLAlchemyError as exc:
            raise wrap_error("verifying the ledger", exc, self._url) from exc

    def counts(self) -> StoreCounts:
        """Row counts of roots, intermediates and ledger entries."""

        def count(session: Session, model: type[SQLModel]) -> int:
            return session.exec(select(func.count()).select_from(model)).one()

        with self._session("counting rows") as session:
            return StoreCounts(
                roots=count(session, RootRecord),
                intermediates=count(session, IntermediateRecord),
                issued=count(session, LedgerEntry),
            )


def _table(model: type[SQLModel]) -> Table:
    table = model.__table__  # type: ignore[attr-defined]
    assert isinstance(table, Table)
    return table


def _check_times(**values: datetime) -> None:
    """Refuse naive datetimes before they reach the database (ValueError naming the field)."""
    for name, value in values.items():
        to_utc(value, field=name)
