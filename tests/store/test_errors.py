"""Failures come out as StoreError naming what failed, never with a password."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from meshca.errors import StoreError
from meshca.store import Store

PASSWORD = "s3cr3t-Passw0rd"
UNREACHABLE = f"postgresql+psycopg://meshca:{PASSWORD}@127.0.0.1:1/meshca"


def test_unreachable_database_fails_to_open_without_leaking_the_password() -> None:
    with pytest.raises(StoreError) as info:
        Store.open(UNREACHABLE)
    error = info.value
    assert error.reason == "database_unavailable"
    assert "migrating the database schema failed" in error.message
    assert "postgresql+psycopg://meshca:***@127.0.0.1:1/meshca" in error.message
    assert PASSWORD not in str(error)
    assert PASSWORD not in repr(error)


def test_ping_reports_an_unreachable_database() -> None:
    store = Store(UNREACHABLE)
    try:
        with pytest.raises(StoreError) as info:
            store.ping()
    finally:
        store.close()
    assert info.value.reason == "database_unavailable"
    assert "127.0.0.1:1" in info.value.message
    assert PASSWORD not in info.value.message


def test_ping_succeeds_on_a_live_database(store: Store) -> None:
    store.ping()


def test_redacted_url_hides_the_password() -> None:
    store = Store(UNREACHABLE)
    try:
        assert store.redacted_url() == "postgresql+psycopg://meshca:***@127.0.0.1:1/meshca"
    finally:
        store.close()


def test_plain_postgresql_urls_use_psycopg() -> None:
    store = Store("postgresql://meshca@127.0.0.1:1/meshca")
    try:
        assert store.redacted_url().startswith("postgresql+psycopg://")
    finally:
        store.close()


@pytest.mark.parametrize(
    "url", ["not a url", f"mysql+nosuchdriver://u:{PASSWORD}@h/db", "nosuchdb://x"]
)
def test_unusable_urls_are_refused_clearly(url: str) -> None:
    with pytest.raises(StoreError) as info:
        Store(url)
    assert info.value.reason == "invalid_database_url"
    assert PASSWORD not in info.value.message


def test_sqlite_parent_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "meshca.db"
    store = Store.open(f"sqlite:///{path}")
    try:
        store.ping()
    finally:
        store.close()
    assert path.is_file()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
