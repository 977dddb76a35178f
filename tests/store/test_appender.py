"""Ledger appends on a held connection (Store.ledger_appender), on SQLite and PostgreSQL:
the same chain as the session path, the same errors, and a stale connection replaced."""

from __future__ import annotations

import threading

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from meshca.errors import StoreError
from meshca.store import Store
from tests.store.helpers import issuance, tamper


def test_rows_interleave_with_the_session_path_in_one_chain(store: Store) -> None:
    appender = store.ledger_appender()
    first = appender.append([issuance(1), issuance(2)])
    middle = store.append_issuances([issuance(3)])
    last = appender.append([issuance(4)])
    assert [r.sequence for r in (*first, *middle, *last)] == [1, 2, 3, 4]
    assert last[0].prev_hash == middle[0].row_hash
    assert appender.append([]) == []
    report = store.verify_ledger()
    assert report.ok and report.rows_checked == 4
    listed = store.list_ledger(limit=10)
    assert [e.row_hash for e in sorted(listed, key=lambda e: e.sequence)] == [
        r.row_hash for r in (*first, *middle, *last)
    ]
    assert appender.connections_opened == 1


def test_threads_of_two_appenders_extend_one_chain(database_url: str) -> None:
    one, two = Store.open(database_url), Store.open(database_url)
    try:
        appenders = [one.ledger_appender(), two.ledger_appender()]

        def work(k: int) -> None:
            for n in range(k * 100 + 1, k * 100 + 21):
                appenders[k].append([issuance(n)])

        threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        report = one.verify_ledger()
        assert report.ok and report.rows_checked == 40
    finally:
        one.close()
        two.close()


def test_a_duplicate_request_id_is_an_integrity_error_and_the_connection_goes_on(
    store: Store,
) -> None:
    appender = store.ledger_appender()
    sid = "spiffe://cluster.local/ns/default/sa/web"
    appender.append([issuance(1, request_id="r-1", spiffe_id=sid)])
    with pytest.raises(StoreError) as caught:
        appender.append([issuance(2), issuance(3, request_id="r-1", spiffe_id=sid)])
    assert caught.value.reason == "integrity_error"
    assert "appending to the ledger failed" in caught.value.message
    assert appender.append([issuance(4)])[0].sequence == 2  # nothing of the failed batch
    assert store.verify_ledger().ok


def test_a_missing_head_row_is_reported_as_corruption(store: Store, database_url: str) -> None:
    appender = store.ledger_appender()
    with tamper(database_url) as db:
        db.execute(text("DELETE FROM ledger_head"))
    with pytest.raises(StoreError) as caught:
        appender.append([issuance(1)])
    assert caught.value.reason == "ledger_corrupt"
    assert "ledger_head row is missing" in caught.value.message


def test_a_closed_store_refuses_appends(store: Store) -> None:
    appender = store.ledger_appender()
    appender.append([issuance(1)])
    store.close()
    with pytest.raises(StoreError) as caught:
        appender.append([issuance(2)])
    assert caught.value.reason == "store_closed"


def test_an_unreachable_database_is_unavailable() -> None:
    appender = Store("postgresql+psycopg://nobody@127.0.0.1:1/none").ledger_appender()
    with pytest.raises(StoreError) as caught:
        appender.append([issuance(1)])
    assert caught.value.reason == "database_unavailable"


@pytest.mark.postgres
def test_a_connection_the_server_closed_while_idle_is_replaced(postgres_url: str) -> None:
    """PostgreSQL restarted (or an idle timeout) closed the held connection: the next
    append opens a new one and succeeds, as the session path's pre-ping would."""
    store = Store.open(postgres_url)
    try:
        appender = store.ledger_appender()
        appender.append([issuance(1)])
        url = make_url(postgres_url)
        with psycopg.connect(
            host=url.host, port=url.port or 5432, user=url.username, dbname=url.database
        ) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        assert appender.append([issuance(2)])[0].sequence == 2
        assert appender.connections_opened == 2
        assert store.verify_ledger().ok
    finally:
        store.close()
