"""Store.ledger_problems: could a ledger append succeed now? On SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from meshca.store import Store
from meshca.store.migrate import head_revision
from tests.store.helpers import issuance, tamper


@contextmanager
def head_locked(database_url: str) -> Iterator[None]:
    """Another writer holding the ledger head's lock (SQLite: the database write lock)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        assert url.database is not None
        other = sqlite3.connect(url.database, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")
            other.close()
        return
    engine = create_engine(database_url)
    try:
        with engine.connect() as other, other.begin():
            other.execute(text("SELECT * FROM ledger_head WHERE id = 1 FOR UPDATE"))
            yield
    finally:
        engine.dispose()


def test_a_healthy_ledger_has_no_problems_and_the_check_writes_nothing(store: Store) -> None:
    store.append_issuance(issuance(1))
    assert store.ledger_problems() == []
    assert store.ledger_problems() == []
    report = store.verify_ledger()
    assert report.ok and report.rows_checked == 1 and report.head_sequence == 1
    assert store.append_issuance(issuance(2)).sequence == 2


def test_a_held_head_lock_is_named_within_the_bound(store: Store, database_url: str) -> None:
    with head_locked(database_url):
        problems = store.ledger_problems(lock_timeout=0.2)
    assert len(problems) == 1
    assert problems[0].startswith("ledger head: held by another writer for over 0.2s")
    # Released: ready again, and appends wait as long as they always did.
    assert store.ledger_problems() == []
    assert store.append_issuance(issuance(1)).sequence == 1


def test_a_schema_at_another_revision_is_named(store: Store, database_url: str) -> None:
    with tamper(database_url) as db:
        db.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    assert store.ledger_problems() == [
        f"schema: at revision 9999_future, this meshca needs {head_revision()} "
        "(run `meshca admin db upgrade`, or restore the database)"
    ]


def test_a_dropped_schema_is_named(store: Store, database_url: str) -> None:
    with tamper(database_url) as db:
        for table in ("alembic_version", "ledger", "ledger_head"):
            db.execute(text(f"DROP TABLE {table}"))
    problems = store.ledger_problems()
    assert problems == [
        f"schema: missing (no alembic_version), this meshca needs {head_revision()} "
        "(run `meshca admin db upgrade`, or restore the database)"
    ]


def test_a_missing_head_row_is_named(store: Store, database_url: str) -> None:
    with tamper(database_url) as db:
        db.execute(text("DELETE FROM ledger_head"))
    assert store.ledger_problems() == [
        "ledger head: the ledger_head row is missing; the ledger cannot be extended "
        "(run `meshca admin ledger verify`)"
    ]


def test_too_little_free_disk_is_named(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("db") / "meshca.db"
    store = Store.open(f"sqlite:///{path}")
    try:
        assert store.ledger_problems() == []
        problems = store.ledger_problems(min_free_bytes=1 << 60)
    finally:
        store.close()
    assert len(problems) == 1
    assert (
        problems[0].startswith("disk: ")
        and f"free on the file system of {path.parent}" in problems[0]
    )
    assert problems[0].endswith(
        "the ledger needs at least 1099511627776.0 MiB (free space, or move the database)"
    )


@pytest.mark.postgres
def test_a_read_only_postgres_is_named(postgres_url: str) -> None:
    Store.open(postgres_url).close()
    database = make_url(postgres_url).database
    with tamper(postgres_url) as db:
        db.execute(text(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on'))
    store = Store(postgres_url)  # a replica (re)started against the read-only database
    try:
        problems = store.ledger_problems()
    finally:
        store.close()
    assert len(problems) == 1
    assert problems[0].startswith("ledger head: not writable: locking the ledger head failed")
    assert "read-only transaction" in problems[0]
