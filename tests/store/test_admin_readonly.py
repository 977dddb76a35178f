"""The read-only admin commands never create or migrate a database, and say why they fail."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic import command
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from meshca.cli.main import main
from meshca.errors import StoreError
from meshca.store import Store
from meshca.store.migrate import alembic_config, head_revision

from .helpers import issuance, tamper

READ_COMMANDS = [
    ["admin", "status"],
    ["admin", "ledger", "verify"],
    ["admin", "ledger", "list"],
    ["admin", "root", "list"],
]


@pytest.mark.parametrize("args", READ_COMMANDS, ids=lambda a: " ".join(a[1:]))
def test_a_mistyped_state_dir_is_an_error_and_creates_nothing(
    tmp_path: Path, args: list[str]
) -> None:
    state_dir = tmp_path / "no-such-dir"
    result = CliRunner().invoke(main, [*args, "--state-dir", str(state_dir)])
    assert result.exit_code == 1, result.output
    assert (
        f"meshca: error: no meshca database at {state_dir / 'meshca.db'} "
        "(check --state-dir / --database-url)"
    ) in result.output
    assert "OK" not in result.output
    assert not state_dir.exists()


@pytest.mark.parametrize("args", READ_COMMANDS, ids=lambda a: " ".join(a[1:]))
def test_a_file_without_the_schema_is_refused_and_left_alone(
    tmp_path: Path, args: list[str]
) -> None:
    path = tmp_path / "meshca.db"
    sqlite3.connect(path).close()  # an empty SQLite file, e.g. made by a typo'd tool
    result = CliRunner().invoke(main, [*args, "--database-url", f"sqlite:///{path}"])
    assert result.exit_code == 1, result.output
    assert "holds no meshca schema" in result.output
    assert "run `meshca admin db upgrade`" in result.output
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == []


def test_an_old_schema_is_named_and_not_migrated(database_url: str) -> None:
    """A database left at revision 0002 by an older meshca: named, and still at 0002."""
    engine = create_engine(database_url)
    if engine.dialect.name == "sqlite":
        Path(engine.url.database or "").parent.mkdir(parents=True)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "0002")
    finally:
        engine.dispose()
    result = CliRunner().invoke(main, ["admin", "ledger", "verify", "--database-url", database_url])
    assert result.exit_code == 1, result.output
    assert f"is at schema revision 0002, not {head_revision()}" in result.output
    assert "run `meshca admin db upgrade`" in result.output
    store = Store(database_url)
    try:
        assert store.current_revision() == "0002"
    finally:
        store.close()


def test_a_read_only_store_cannot_write(store: Store, database_url: str) -> None:
    store.append_issuance(issuance(1))
    reader = Store.open_read_only(database_url)
    try:
        assert reader.verify_ledger().ok
        with pytest.raises(StoreError, match=r"read.only|readonly"):
            reader.append_issuance(issuance(2))
    finally:
        reader.close()
    assert store.counts().issued == 1


def test_db_upgrade_still_creates_the_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'meshca.db'}"
    created = CliRunner().invoke(main, ["admin", "db", "upgrade", "--database-url", url])
    assert created.exit_code == 0, created.output
    result = CliRunner().invoke(main, ["admin", "ledger", "verify", "--database-url", url])
    assert result.exit_code == 0, result.output
    assert "ledger OK: 0 rows verified" in result.output


def test_a_dropped_table_is_named(store: Store, database_url: str) -> None:
    with tamper(database_url) as db:
        db.execute(text("DROP TABLE ledger_head"))
    result = CliRunner().invoke(main, ["admin", "ledger", "verify", "--database-url", database_url])
    assert result.exit_code == 1, result.output
    assert f"is at schema revision {head_revision()} but has no ledger_head table(s)" in (
        result.output
    )
