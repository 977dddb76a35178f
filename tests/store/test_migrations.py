"""Schema migrations: applied on start, idempotent, concurrent-safe, matching the models."""

from __future__ import annotations

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlmodel import SQLModel

from meshca.errors import StoreError
from meshca.store import Store
from meshca.store.migrate import head_revision

from .helpers import issuance, tamper

TABLES = {
    "roots",
    "intermediates",
    "ledger",
    "ledger_head",
    "used_tokens",
    "join_tokens",
    "alembic_version",
}


def test_fresh_database_is_upgraded_to_head(database_url: str) -> None:
    store = Store(database_url)
    try:
        assert store.current_revision() is None
        store.upgrade()
        assert store.current_revision() == head_revision()
    finally:
        store.close()
    engine = create_engine(database_url)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_twice_is_a_no_op(store: Store) -> None:
    store.append_issuance(issuance(1))
    store.upgrade()
    store.upgrade()
    assert store.current_revision() == head_revision()
    assert store.counts().issued == 1
    assert store.verify_ledger().ok


def test_migration_matches_the_models(store: Store, database_url: str) -> None:
    """The hand-written migration creates exactly what the SQLModel tables declare."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_concurrent_upgrades_on_a_fresh_database(database_url: str) -> None:
    """Replicas starting together all succeed; the schema is created once."""
    stores = [Store(database_url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def start(store: Store) -> None:
        barrier.wait()
        try:
            store.upgrade()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert {s.current_revision() for s in stores} == {head_revision()}
        assert stores[0].verify_ledger().ok
    finally:
        for s in stores:
            s.close()


def test_database_from_a_newer_meshca_is_refused(store: Store, database_url: str) -> None:
    with tamper(database_url) as db:
        db.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(StoreError, match="revision 9999") as info:
        store.upgrade()
    assert info.value.reason == "unknown_schema_revision"
