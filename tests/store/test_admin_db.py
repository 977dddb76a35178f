"""``meshca admin db upgrade``: applies the migrations and says where the database stands."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from meshca.cli.main import main
from meshca.store import Store


def test_db_upgrade_creates_the_schema_and_reports_the_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'meshca.db'}"
    result = CliRunner().invoke(main, ["admin", "db", "upgrade", "--database-url", url])
    assert result.exit_code == 0, result.output
    store = Store(url)
    try:
        revision = store.current_revision()
    finally:
        store.close()
    assert revision is not None
    assert f"at revision {revision}" in result.output
    again = CliRunner().invoke(main, ["admin", "db", "upgrade", "--database-url", url])
    assert again.exit_code == 0 and f"at revision {revision}" in again.output


def test_db_upgrade_names_an_unusable_database(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["admin", "db", "upgrade", "--database-url", "mysql://nobody@127.0.0.1:1/x"]
    )
    assert result.exit_code == 1
    assert "meshca: error:" in result.output and "mysql" in result.output
