"""/readyz says 200 only when a ledger append could succeed now, and names what is wrong."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
from pathlib import Path

import pytest

from meshca.api.http import CachedCheck
from meshca.errors import StoreError
from meshca.server import READINESS_RECHECK_SECONDS
from meshca.store.migrate import head_revision
from tests.api.conftest import CA


def _database(ca: CA) -> Path:
    return ca.server.settings.state_dir / "meshca.db"


async def _past_the_last_check() -> None:
    await asyncio.sleep(READINESS_RECHECK_SECONDS + 0.1)


async def test_ready_while_another_writer_holds_the_ledger_then_not(ca: CA) -> None:
    assert await ca.get("/readyz") == (200, "ready\n")
    await _past_the_last_check()
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
    await _past_the_last_check()
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


async def test_a_flood_of_probes_checks_the_ledger_once(
    ca: CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/readyz is unauthenticated: 50 probes at once must not take the head's write lock 50
    times (each check locks it for writing)."""
    await _past_the_last_check()
    store = ca.server.store
    calls = 0
    real = store.ledger_problems

    def counted() -> list[str]:
        nonlocal calls
        calls += 1
        return real()

    monkeypatch.setattr(store, "ledger_problems", counted)
    answers = await asyncio.gather(*(ca.get("/readyz") for _ in range(50)))
    assert answers == [(200, "ready\n")] * 50
    assert calls == 1


async def test_a_cached_check_shares_one_run_and_remembers_its_outcome() -> None:
    now = 0.0
    runs = 0
    fail = False
    gate = asyncio.Event()

    async def check() -> None:
        nonlocal runs
        runs += 1
        await gate.wait()
        if fail:
            raise StoreError("ledger head: held", reason="ledger_not_writable")

    cached = CachedCheck(check, ok_for=30, failed_for=1, clock=lambda: now)
    probes = [asyncio.ensure_future(cached()) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*probes)
    assert runs == 1
    now = 29.9
    await cached()
    assert runs == 1

    now, fail = 30.0, True
    with pytest.raises(StoreError, match="ledger head: held"):
        await cached()
    with pytest.raises(StoreError, match="ledger head: held"):
        await cached()
    assert runs == 2
    now, fail = 31.0, False
    await cached()
    assert runs == 3


async def test_a_probe_that_gives_up_does_not_cancel_the_shared_run() -> None:
    gate = asyncio.Event()
    runs = 0

    async def check() -> None:
        nonlocal runs
        runs += 1
        await gate.wait()

    cached = CachedCheck(check, ok_for=30, failed_for=1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(cached(), 0.01)
    waiting = asyncio.ensure_future(cached())
    await asyncio.sleep(0)
    gate.set()
    await waiting
    assert runs == 1


async def test_a_failure_nobody_waited_for_is_not_reported_as_unretrieved() -> None:
    gate = asyncio.Event()
    reported: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    async def check() -> None:
        await gate.wait()
        raise StoreError("ledger head: held", reason="ledger_not_writable")

    cached = CachedCheck(check, ok_for=30, failed_for=1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(cached(), 0.01)
    gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    del cached
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert reported == []
