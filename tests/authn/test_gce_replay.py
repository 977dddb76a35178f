"""Replay: a GCE identity token gets one certificate, whichever CA replica it is shown to.

The store keeps the token's SHA-256 (never the token) until it expires; the insert that
records it is the check, so replicas sharing the database agree without talking.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from alembic import command
from sqlalchemy import create_engine, insert, inspect, select, text, update

from meshca.agent.credential_sources import GceMetadataServer
from meshca.authn.base import Credential, Peer
from meshca.authn.gce import GceAuthenticator, token_digest
from meshca.config import load_settings
from meshca.server import RunningServer, start_server
from meshca.store import GENESIS_HASH, LedgerEntry, LedgerHead, Store
from meshca.store.chain import DELEGATION_COLUMNS
from meshca.store.migrate import alembic_config, head_revision
from meshca.store.models import UsedToken
from tests.fakes.gce import (
    WEB_ID,
    FakeGoogleCerts,
    FakeMetadataServer,
    GceVm,
    ca_options,
)
from tests.store.helpers import issuance
from tests.support import create_certificate, load_chain, make_csr, tls_channel, uri_sans

LATER = datetime.now(UTC) + timedelta(hours=1)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared' / 'meshca.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def stores(database_url: str) -> Iterator[tuple[Store, Store]]:
    """Two Stores (as two replicas hold them) on one database."""
    first = Store.open(database_url)
    second = Store(database_url)
    yield first, second
    first.close()
    second.close()


def _digest(n: int) -> str:
    return hashlib.sha256(f"token-{n}".encode()).hexdigest()


# -- the store ----------------------------------------------------------------------------


def test_a_digest_is_recorded_once(stores: tuple[Store, Store]) -> None:
    first, second = stores
    assert first.record_token_use(_digest(1), "gce-iit", LATER) is True
    assert second.record_token_use(_digest(1), "gce-iit", LATER) is False
    assert first.record_token_use(_digest(1), "gce-iit", LATER) is False
    assert second.record_token_use(_digest(2), "gce-iit", LATER) is True


def test_racing_replicas_get_exactly_one_yes(stores: tuple[Store, Store]) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(8)
    lock = threading.Lock()

    def use(store: Store) -> None:
        barrier.wait(timeout=10)
        outcome = store.record_token_use(_digest(7), "gce-iit", LATER)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=use, args=(stores[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == [False] * 7 + [True]


def test_expired_digests_are_purged_and_only_those(stores: tuple[Store, Store]) -> None:
    first, _ = stores
    now = datetime.now(UTC)
    first.record_token_use(_digest(1), "gce-iit", now - timedelta(seconds=1))
    first.record_token_use(_digest(2), "gce-iit", now + timedelta(minutes=5))
    assert first.purge_used_tokens(now) == 1
    assert first.purge_used_tokens(now) == 0
    assert first.record_token_use(_digest(2), "gce-iit", LATER) is False


def test_the_token_itself_is_never_stored(stores: tuple[Store, Store], database_url: str) -> None:
    token = "eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl"
    stores[0].record_token_use(token_digest(token), "gce-iit", LATER)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(UsedToken.__table__)).all()  # type: ignore[attr-defined]
    finally:
        engine.dispose()
    assert [row.token_sha256 for row in rows] == [hashlib.sha256(token.encode()).hexdigest()]
    assert token not in repr(rows)


@pytest.mark.parametrize(
    ("digest", "expires_at", "message"),
    [
        ("ABC", LATER, "64 lowercase hex"),
        (_digest(1).upper(), LATER, "64 lowercase hex"),
        (_digest(1), datetime(2030, 1, 1), "timezone-aware"),
    ],
)
def test_bad_input_is_refused_before_the_database(
    stores: tuple[Store, Store], digest: str, expires_at: datetime, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        stores[0].record_token_use(digest, "gce-iit", expires_at)


def test_a_database_at_revision_0001_is_upgraded_keeping_its_ledger(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0001")
        assert "used_tokens" not in inspect(engine).get_table_names()
        row = issuance(1).to_row(1, GENESIS_HASH)
        columns = {  # the ledger as revision 0001 had it (today's has more columns)
            k: v for k, v in row.columns().items() if k not in DELEGATION_COLUMNS
        }
        with engine.begin() as conn:
            conn.execute(insert(LedgerEntry.__table__).values(**columns))  # type: ignore[arg-type]
            conn.execute(
                update(LedgerHead.__table__).values(last_sequence=1, last_hash=row.row_hash)  # type: ignore[arg-type]
            )
    finally:
        engine.dispose()
    store = Store.open(url)
    try:
        assert store.current_revision() == head_revision()
        assert store.verify_ledger().ok and store.counts().issued == 1
        assert store.record_token_use(_digest(1), "gce-iit", LATER) is True
    finally:
        store.close()


# -- the authenticator purges ---------------------------------------------------------------


async def test_the_authenticator_deletes_expired_digests(tmp_path: Path) -> None:
    async with (
        FakeGoogleCerts() as google,
        FakeMetadataServer(google, GceVm()) as metadata,
    ):
        settings = load_settings(state_dir=tmp_path, **ca_options(google))
        assert settings.gce is not None
        store = Store.open(settings.effective_database_url)
        auth = GceAuthenticator(settings.trust_domain_value, settings.gce, store)
        try:
            store.record_token_use(_digest(9), "gce-iit", datetime.now(UTC) - timedelta(hours=2))
            token = await GceMetadataServer(metadata.url).identity_token("spiffe://cluster.local")
            await auth.authenticate(Credential(bearer_token=token), Peer("10.0.0.2:1"))
            assert store.record_token_use(_digest(9), "gce-iit", LATER) is True  # purged
            assert store.record_token_use(token_digest(token), "gce-iit", LATER) is False
        finally:
            await auth.close()
            store.close()


# -- two CA replicas, one database -------------------------------------------------------


@dataclass
class Replica:
    server: RunningServer
    channel: grpc.aio.Channel

    def failures(self, reason: str) -> float:
        text = self.server.metrics.exposition().decode()
        prefix = f'meshca_authentication_failures_total{{reason="{reason}"}} '
        for line in text.splitlines():
            if line.startswith(prefix):
                return float(line[len(prefix) :])
        return 0.0


@pytest.fixture
async def google() -> AsyncIterator[FakeGoogleCerts]:
    async with FakeGoogleCerts() as certs:
        yield certs


@pytest.fixture
async def metadata(google: FakeGoogleCerts) -> AsyncIterator[FakeMetadataServer]:
    async with FakeMetadataServer(google, GceVm()) as server:
        yield server


@pytest.fixture
async def replicas(
    google: FakeGoogleCerts, database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[Replica, Replica]]:
    started: list[Replica] = []
    options: dict[str, Any] = {
        "state_dir": tmp_path / "state",  # one root key file, as replicas share a KMS key
        "database_url": database_url,
        "grpc_listen": "127.0.0.1:0",
        "grpc_mtls_listen": "off",
        "http_listen": "127.0.0.1:0",
        **ca_options(google),
    }
    try:
        for _ in range(2):
            server = await start_server(load_settings(**options))
            url = f"http://127.0.0.1:{server.http_port}/v1/bundle"
            async with aiohttp.ClientSession() as session, session.get(url) as resp:
                root_pem = await resp.read()
            channel = tls_channel(f"127.0.0.1:{server.grpc_port}", root_pem)
            started.append(Replica(server, channel))
        yield started[0], started[1]
    finally:
        for replica in started:
            await replica.channel.close()
            await replica.server.stop(grace=0)


async def test_a_token_used_at_one_replica_is_refused_at_the_other(
    replicas: tuple[Replica, Replica], metadata: FakeMetadataServer
) -> None:
    a, b = replicas
    fetcher = GceMetadataServer(metadata.url)
    token = await fetcher.identity_token("spiffe://cluster.local")
    _, csr = make_csr(WEB_ID)
    chain = await create_certificate(a.channel, csr, token=token)
    assert uri_sans(load_chain(chain)[0]) == [WEB_ID]

    for replica in (b, a):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await create_certificate(replica.channel, csr, token=token)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "already used" in (info.value.details() or "")
    assert b.failures("token_replayed") == 1 and a.failures("token_replayed") == 1

    fresh = await fetcher.identity_token("spiffe://cluster.local")
    chain = await create_certificate(b.channel, csr, token=fresh)
    assert uri_sans(load_chain(chain)[0]) == [WEB_ID]

    store = a.server.store
    with store._engine.connect() as conn:  # the evidence reached the ledger
        rows = conn.execute(
            text("SELECT auth_method, evidence FROM ledger WHERE spiffe_id = :id"),
            {"id": WEB_ID},
        ).all()
    assert len(rows) == 2
    for method, evidence in rows:
        assert method == "gce-iit"
        assert evidence.split(",") == [
            "gce:project-id:meshca-vms",
            "gce:project-number:123456789012",
            "gce:zone:europe-west1-b",
            "gce:instance-id:4613265537823984331",
            "gce:instance-name:web-1",
            "gce:service-account:web@meshca-vms.iam.gserviceaccount.com",
        ]
