"""Group commit: concurrent issuances share transactions; every row still commits."""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from meshca.ca.ledger import LedgerWriter
from meshca.errors import StoreError
from meshca.store import Store, engine
from tests.store.helpers import issuance


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(f"sqlite:///{tmp_path / 'meshca.db'}")
    yield opened
    opened.close()


async def test_concurrent_appends_share_commits_and_chain(store: Store) -> None:
    writer = LedgerWriter(store)
    rows = await asyncio.gather(*(writer.append(issuance(n)) for n in range(1, 101)))
    assert sorted(r.sequence for r in rows) == list(range(1, 101))
    assert writer.rows == 100
    assert writer.batches < 100  # some commits carried several rows
    assert store.verify_ledger().ok


async def test_a_duplicate_request_id_fails_alone(store: Store) -> None:
    writer = LedgerWriter(store)
    sid = "spiffe://cluster.local/ns/default/sa/web"
    await writer.append(issuance(1, request_id="r-1", spiffe_id=sid))
    results = await asyncio.gather(
        writer.append(issuance(2)),
        writer.append(replace(issuance(3, request_id="r-1", spiffe_id=sid))),
        writer.append(issuance(4)),
        return_exceptions=True,
    )
    assert isinstance(results[1], StoreError) and results[1].reason == "integrity_error"
    assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException)
    assert store.counts().issued == 3
    assert store.verify_ledger().ok


async def test_database_failure_reaches_every_waiter(store: Store) -> None:
    writer = LedgerWriter(store)
    store.close()
    broken = Store("postgresql+psycopg://nobody@127.0.0.1:1/none")
    writer = LedgerWriter(broken)
    results = await asyncio.gather(
        *(writer.append(issuance(n)) for n in range(1, 4)), return_exceptions=True
    )
    assert all(isinstance(r, StoreError) for r in results)


async def _abandon_during_a_lock_timeout(store: Store) -> None:
    """Two requests whose rows wait for a lock, cancelled before the lock times out."""
    writer = LedgerWriter(store)
    waiters = [asyncio.create_task(writer.append(issuance(n))) for n in (1, 2)]
    await asyncio.sleep(0.2)  # the batch is in the database, waiting for the lock
    for waiter in waiters:
        waiter.cancel()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    async with asyncio.timeout(30):
        while not writer.idle:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0)  # the outcomes' callback
    await writer.close()


async def test_a_lock_timeout_after_the_caller_gave_up_is_logged_once_and_nothing_leaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A request cancelled (its deadline passed) while its row waits for a database lock:
    the failed commit is one ERROR line without a stack, and asyncio does not complain
    later that the row's outcome was never retrieved."""
    monkeypatch.setattr(engine, "SQLITE_BUSY_TIMEOUT_SECONDS", 1)
    path = tmp_path / "meshca.db"
    store = Store.open(f"sqlite:///{path}")
    loop = asyncio.get_running_loop()
    unhandled: list[object] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context.get("message")))
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        await _abandon_during_a_lock_timeout(store)
        for _ in range(3):
            gc.collect()
        await asyncio.sleep(0)
    finally:
        blocker.rollback()
        blocker.close()
        store.close()
        loop.set_exception_handler(None)
    assert unhandled == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage().startswith("ledger write failed; 2 certificate(s) withheld")
    assert "database is locked" in errors[0].getMessage()
    assert errors[0].exc_info is None


def _callers_give_up_then_the_batch_fails_and_the_loop_stops(unhandled: list[object]) -> None:
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context.get("message")))

    def one_turn() -> None:
        loop.stop()
        loop.run_forever()  # a stopped loop runs what is ready once, then returns

    try:
        # A database nobody listens on: the commit fails (connection refused).
        writer = LedgerWriter(Store("postgresql+psycopg://nobody@127.0.0.1:1/none"))
        callers = [loop.create_task(writer.append(issuance(n))) for n in (1, 2)]
        one_turn()  # the callers queue their rows and start the flusher
        for caller in callers:
            caller.cancel()
        for _ in range(10_000):
            if writer.idle:
                break
            one_turn()
            time.sleep(0.001)
        assert writer.idle
        one_turn()  # the failed outcomes arrive
        assert all(caller.cancelled() for caller in callers)
    finally:
        loop.close()  # drops whatever the last turn scheduled


def test_a_failed_batch_of_callers_that_gave_up_is_retrieved_even_if_the_loop_stops_next() -> None:
    """Callers cancelled while their batch is in the database, then the commit fails and the
    loop runs no further (a program shutting down, stopping its loop): the failed outcomes
    must be retrieved when they are set, not by callbacks that may never run, or asyncio
    reports "Future exception was never retrieved" when they are collected."""
    unhandled: list[object] = []
    _callers_give_up_then_the_batch_fails_and_the_loop_stops(unhandled)
    for _ in range(3):
        gc.collect()
    assert unhandled == []


async def test_the_audit_line_names_every_certificate_before_its_caller_has_it(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    writer = LedgerWriter(store)
    caplog.set_level(logging.INFO, logger="meshca.audit")
    sid = "spiffe://cluster.local/ns/default/sa/web"
    rid = "6f1c0000-0000-4000-8000-000000000001"
    entries = [issuance(1), issuance(2, request_id=rid, spiffe_id=sid), issuance(3)]
    rows = await asyncio.gather(*(writer.append(e) for e in entries))
    lines = [r.getMessage() for r in caplog.records if r.name == "meshca.audit"]
    logged = " ".join(lines)
    for row in rows:
        assert (
            f"#{row.sequence} {row.spiffe_id} serial {row.serial_hex} "
            f"to {row.peer_address} via {row.auth_method}"
        ) in logged
    assert f"request {rid}" in logged
    assert sum(int(line.split()[1]) for line in lines) == 3  # "issued N certificate(s): ..."
    await writer.close()


async def test_close_writes_what_is_queued_then_stops_and_refuses_more(store: Store) -> None:
    writer = LedgerWriter(store)
    pending = [asyncio.create_task(writer.append(issuance(n))) for n in range(1, 6)]
    await asyncio.sleep(0)  # queued
    await writer.close()
    assert sorted(r.sequence for r in await asyncio.gather(*pending)) == [1, 2, 3, 4, 5]
    assert writer._thread is not None and not writer._thread.is_alive()
    with pytest.raises(StoreError) as caught:
        await writer.append(issuance(6))
    assert caught.value.reason == "store_closed"
    assert store.counts().issued == 5
