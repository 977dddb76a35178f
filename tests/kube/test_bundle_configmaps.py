"""The trust bundle ConfigMap in every namespace, written by one CA at a time.

Real CAs in this process (one SQLite database: replicas sharing a store) talk to a fake
Kubernetes API server on loopback through the official client; a Lease elects the
writer. Root rotation, new namespaces, tampering and the writer going away are played
as an operator would meet them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from meshca.ca.roots import prepare_root
from meshca.config import load_settings
from meshca.pki.bundle import bundle_pem
from meshca.pki.keys import KeyAlgorithm
from meshca.server import RunningServer, start_server
from meshca.signers.file import FileSigner
from meshca.spiffe import TrustDomain
from meshca.store import Store
from tests.fakes.kube_objects import FakeKubeObjects

NAME, KEY = "istio-ca-root-cert", "root-cert.pem"
LEASE = ("meshca-system", "meshca-bundle-writer")
STEP = 15.0


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeObjects]:
    async with FakeKubeObjects(namespaces=("default", "kube-system", "meshca-system")) as fake:
        yield fake


def writer_options(api: FakeKubeObjects, tmp_path: Path) -> dict[str, Any]:
    token = tmp_path / "writer-token"
    token.write_text("meshca-writer-token\n")
    return {
        "enabled": True,
        "api_server": api.url,
        "credentials_file": str(token),
        "lease_namespace": LEASE[0],
        "lease_duration": "3s",
        "renew_deadline": "2s",
        "retry_period": "500ms",
        "resync_interval": "2s",
        "timeout": "2s",
    }


@pytest.fixture
async def cas(api: FakeKubeObjects, tmp_path: Path) -> AsyncIterator[list[RunningServer]]:
    """Two CAs on one database, both candidates for the Lease."""
    settings = load_settings(
        state_dir=tmp_path / "state",
        grpc_listen="127.0.0.1:0",
        grpc_mtls_listen="off",
        http_listen="127.0.0.1:0",
        maintenance_interval="200ms",
        bundle_configmap=writer_options(api, tmp_path),
    )
    started = [await start_server(settings), await start_server(settings)]
    yield started
    for server in started:
        await server.stop(grace=0)


async def until(check: Callable[[], bool], what: str, timeout: float = STEP) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.05)


def published(api: FakeKubeObjects, namespace: str) -> str | None:
    configmap = api.configmap(namespace, NAME)
    return None if configmap is None else configmap.get("data", {}).get(KEY)


def holders(cas: list[RunningServer]) -> list[RunningServer]:
    return [s for s in cas if s.bundle_writer is not None and s.bundle_writer.elector.leading]


async def test_every_namespace_gets_the_bundle_from_one_writer(
    api: FakeKubeObjects, cas: list[RunningServer]
) -> None:
    pem = bundle_pem(cas[0].authority.trust_bundle())
    await until(
        lambda: all(published(api, ns) == pem for ns in api.namespaces), "ConfigMaps written"
    )
    assert len(holders(cas)) == 1
    lease = api.lease(*LEASE)
    assert lease is not None
    (writer,) = holders(cas)
    assert lease["spec"]["holderIdentity"] == writer.authority.owner
    configmap = api.configmap("default", NAME)
    assert configmap is not None
    assert configmap["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "meshca"}
    x509.load_pem_x509_certificates(pem.encode())  # a PEM bundle a client can load

    api.add_namespace("shop")  # a namespace created later gets it through the watch
    await until(lambda: published(api, "shop") == pem, "the new namespace's ConfigMap")
    assert len(holders(cas)) == 1


async def test_a_deleted_or_edited_configmap_is_put_back(
    api: FakeKubeObjects, cas: list[RunningServer]
) -> None:
    pem = bundle_pem(cas[0].authority.trust_bundle())
    await until(lambda: published(api, "default") == pem, "written")
    api.delete_configmap("default", NAME)
    edited = api.configmap("kube-system", NAME)
    assert edited is not None
    edited["data"][KEY] = "tampered"
    await until(
        lambda: published(api, "default") == pem and published(api, "kube-system") == pem,
        "repaired at the resync",
    )


async def test_a_namespace_being_deleted_is_skipped_quietly(
    api: FakeKubeObjects, cas: list[RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    api.add_namespace("leaving")
    api.terminate_namespace("leaving")  # before the writer sees it
    api.add_namespace("next")
    await until(lambda: published(api, "next") is not None, "the next namespace written")
    assert published(api, "leaving") is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "leaving" in w]


async def test_a_prepared_root_reaches_every_configmap(
    api: FakeKubeObjects, cas: list[RunningServer], tmp_path: Path
) -> None:
    old = bundle_pem(cas[0].authority.trust_bundle())
    await until(lambda: all(published(api, ns) == old for ns in api.namespaces), "written")
    store = Store.open(f"sqlite:///{tmp_path / 'state' / 'meshca.db'}")
    try:
        key = FileSigner.create(tmp_path / "new-root.pem", KeyAlgorithm.EC_P256)
        new = prepare_root(
            store, key, TrustDomain("cluster.local"), ttl=timedelta(days=30), now=datetime.now(UTC)
        )
    finally:
        store.close()

    def both_roots(namespace: str) -> bool:
        pem = published(api, namespace)
        return pem is not None and new.certificate_pem in pem and old in pem

    await until(lambda: all(both_roots(ns) for ns in api.namespaces), "both roots published")
    roots = x509.load_pem_x509_certificates(published(api, "default").encode())  # type: ignore[union-attr]
    assert len(roots) == 2


async def test_the_other_ca_takes_over_when_the_writer_stops(
    api: FakeKubeObjects, cas: list[RunningServer]
) -> None:
    await until(lambda: len(holders(cas)) == 1, "a writer elected")
    (first,) = holders(cas)
    await first.stop(grace=0)
    cas.remove(first)
    lease = api.lease(*LEASE)
    assert lease is not None and lease["spec"].get("holderIdentity") is None  # released
    (second,) = cas
    await until(lambda: holders(cas) == [second], "the other CA holds the Lease", timeout=5)
    api.add_namespace("after")
    pem = bundle_pem(second.authority.trust_bundle())
    await until(lambda: published(api, "after") == pem, "written by the new holder")


async def test_a_writer_cut_off_from_the_api_stops_and_comes_back(
    api: FakeKubeObjects, cas: list[RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    await until(lambda: len(holders(cas)) == 1, "a writer elected")
    api.down = True
    await until(lambda: not holders(cas), "no one writes while the API is unreachable")
    assert any(
        "lost Lease meshca-system/meshca-bundle-writer" in r.getMessage() for r in caplog.records
    )
    api.down = False
    await until(lambda: len(holders(cas)) == 1, "a writer again")
    api.add_namespace("later")
    await until(lambda: published(api, "later") is not None, "written again")
