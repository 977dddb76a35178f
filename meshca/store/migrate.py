"""Applying the Alembic migrations in ``meshca/store/migrations`` from code.

No ``alembic.ini`` is needed at run time: the Alembic config is built here, pointing at
the migrations directory inside the installed package, and the migration runs on a
connection we already hold inside a transaction (``env.py`` picks it up from
``config.attributes["connection"]``). Holding the transaction ourselves is what makes
concurrent start-ups safe: on SQLite it begins with ``BEGIN IMMEDIATE`` (the database
write lock), on PostgreSQL it takes a transaction-scoped advisory lock first. The
second process waits, then finds the schema at head and does nothing. Both databases
run DDL inside the transaction, so a failed migration leaves no half-built schema.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from meshca.errors import StoreError
from meshca.store.engine import SQLITE_BEGIN_OPTION

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# pg_advisory_xact_lock key: an arbitrary constant that only meshca migrations use.
ADVISORY_LOCK_KEY = 0x1B7C0DE5_7A11_0001


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config for meshca's migrations, optionally bound to ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """The newest revision this version of meshca knows."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at (None for an empty database)."""
    return MigrationContext.configure(connection).get_current_revision()


def is_known_revision(revision: str) -> bool:
    """Whether ``revision`` is one of this meshca's migrations."""
    return _known(ScriptDirectory.from_config(alembic_config()), revision)


def _known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except CommandError:
        return False


def upgrade(engine: Engine) -> None:
    """Bring the schema to head in one locked transaction; a no-op when already there."""
    with engine.connect() as connection:
        connection.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
        with connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY}
                )
            current = current_revision(connection)
            script = ScriptDirectory.from_config(alembic_config())
            if current is not None and not _known(script, current):
                raise StoreError(
                    f"the database schema is at revision {current}, which this meshca "
                    f"does not know (its newest is {script.get_current_head()}); "
                    "was it migrated by a newer meshca?",
                    reason="unknown_schema_revision",
                )
            try:
                command.upgrade(alembic_config(connection), "head")
            except CommandError as exc:
                raise StoreError(
                    f"database migration failed: {exc}", reason="migration_failed"
                ) from exc
            head = script.get_current_head()
            if current != head:
                log.info(
                    "database schema upgraded from %s to revision %s",
                    f"revision {current}" if current else "nothing (a new database)",
                    head,
                )
