"""Group commit: concurrent issuances share transactions; every row still commits."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from meshca.ca.ledger import LedgerWriter
from meshca.errors import StoreError
from meshca.store import Store
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
