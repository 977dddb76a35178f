"""/readyz says 200 only when a ledger append could succeed now, and names what is wrong."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from meshca.store.migrate import head_revision
from tests.api.conftest import CA


def _database(ca: CA) -> Path:
    return ca.server.settings.state_dir / "meshca.db"


async def test_ready_while_another_writer_holds_the_ledger_then_not(ca: CA) -> None:
    assert await ca.get("/readyz") == (200, "ready\n")
    other = sqlite3.connect(_database(ca), isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        status, body = await ca.get("/readyz")
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert status == 503
    assert body.startswith("not ready\ndatabase: ledger head: held by another writer for over 1s")
    assert "database is locked" in body
    assert await ca.get("/readyz") == (200, "ready\n")


async def test_a_schema_this_meshca_does_not_know_is_not_ready(ca: CA) -> None:
    with sqlite3.connect(_database(ca)) as db:
        db.execute("UPDATE alembic_version SET version_num = '9999_future'")
    status, body = await ca.get("/readyz")
    assert status == 503
    assert body == (
        f"not ready\ndatabase: schema: at revision 9999_future, this meshca needs "
        f"{head_revision()} (run `meshca admin db upgrade`, or restore the database)\n"
    )


async def test_a_dropped_ledger_is_not_ready(ca: CA) -> None:
    with sqlite3.connect(_database(ca)) as db:
        db.execute("DROP TABLE ledger_head")
    status, body = await ca.get("/readyz")
    assert status == 503
    assert "database: ledger head: not writable" in body and "no such table" in body
