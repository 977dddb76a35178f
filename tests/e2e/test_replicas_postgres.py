"""Two ``meshca server`` processes on one PostgreSQL database, as two pods would run.

They share the database and the root key (here a key file in one state directory; in a
cluster an HSM or KMS) and nothing else: each signs with its own intermediate under the
one root, the ledger stays one verified hash chain, a replica killed with SIGKILL under
load leaves a ledger row for every certificate it returned, a single-use token (a GCE
instance identity token, a join token) spent at one replica is refused at the other, and
the trust bundle ConfigMap writer moves to the survivor when its holder is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshca.pki.profile import fingerprint
from meshca.store import Store
from tests.e2e.conftest import ServerProcess, run_meshca, start_meshca
from tests.fakes.gce import FakeGoogleCerts, GceVm, identity_claims
from tests.fakes.kube import FakeKubeApi
from tests.fakes.kube_objects import FakeKubeObjects
from tests.support import create_certificate, load_chain, make_csr, tls_channel, uri_sans

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

LEASE = ("meshca-system", "meshca-bundle-writer")
AUDIENCE = "spiffe://cluster.local"


@dataclass
class Replicas:
    database_url: str
    kube: FakeKubeApi
    google: FakeGoogleCerts
    objects: FakeKubeObjects
    servers: list[ServerProcess]
    root_pem: bytes
    env: dict[str, str]

    def channel(self, server: ServerProcess) -> grpc.aio.Channel:
        return tls_channel(f"127.0.0.1:{server.grpc_port}", self.root_pem)


async def _bundle(server: ServerProcess) -> bytes:
    url = f"http://127.0.0.1:{server.http_port}/v1/bundle"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await response.read()


@pytest.fixture
async def replicas(postgres_url: str, tmp_path: Path) -> AsyncIterator[Replicas]:
    async with (
        FakeKubeApi() as kube,
        FakeGoogleCerts() as google,
        FakeKubeObjects(namespaces=("default", "meshca-system")) as objects,
    ):
        token = tmp_path / "writer-token"
        token.write_text("meshca-writer-token\n")
        config = tmp_path / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "k8s_oidc_issuer": kube.issuer,
                    "gce_projects": ["meshca-vms"],
                    "gce_certs_url": google.url,
                    "gce_rules": [
                        {
                            "project": "meshca-vms",
                            "spiffe_id": "spiffe://{trust_domain}/vm/{instance_name}",
                        }
                    ],
                    "bundle_configmap": {
                        "enabled": True,
                        "api_server": objects.url,
                        "credentials_file": str(token),
                        "lease_namespace": LEASE[0],
                        "lease_duration": "3s",
                        "renew_deadline": "2s",
                        "retry_period": "500ms",
                        "resync_interval": "30s",
                        "timeout": "2s",
                    },
                }
            )
        )
        state = tmp_path / "state"  # the root key file, shared as an HSM would be
        args = [
            *("--config", str(config), "--workers", "1", "--state-dir", str(state)),
            *("--grpc-listen", "127.0.0.1:0", "--grpc-mtls-listen", "127.0.0.1:0"),
            *("--http-listen", "127.0.0.1:0"),
        ]
        env = {"MESHCA_DATABASE_URL": postgres_url}
        servers: list[ServerProcess] = []
        try:
            servers.append(await start_meshca(args, env=env))  # creates the root
            servers.append(await start_meshca(args, env=env))
            root_pem = await _bundle(servers[0])
            yield Replicas(postgres_url, kube, google, objects, servers, root_pem, env)
        finally:
            for server in servers:
                await server.stop()
                server.log_path.unlink(missing_ok=True)


async def test_one_root_own_intermediates_one_verified_ledger(replicas: Replicas) -> None:
    first, second = replicas.servers
    assert await _bundle(second) == replicas.root_pem
    intermediates = set()
    for server in (first, second):
        channel = replicas.channel(server)
        try:
            chain = load_chain(
                await create_certificate(
                    channel, make_csr()[1], token=replicas.kube.mint_token("shop", "cart")
                )
            )
        finally:
            await channel.close()
        assert chain[-1].public_bytes(Encoding.PEM) == replicas.root_pem
        intermediates.add(fingerprint(chain[1]))
    assert len(intermediates) == 2, "each replica signs with its own intermediate"
    code, out, err = await run_meshca(
        "admin", "ledger", "verify", "--database-url", replicas.database_url
    )
    assert code == 0, out + err


async def _issue_until_stopped(
    replicas: Replicas, server: ServerProcess, returned: list[x509.Certificate], stop: asyncio.Event
) -> None:
    channel = replicas.channel(server)
    try:
        while not stop.is_set():
            try:
                chain = await create_certificate(
                    channel,
                    make_csr()[1],
                    token=replicas.kube.mint_token("shop", "cart"),
                    timeout=5,
                )
            except grpc.aio.AioRpcError:
                return  # the replica is gone
            returned.append(load_chain(chain)[0])
    finally:
        await channel.close()


async def test_sigkill_under_load_loses_no_returned_certificate(replicas: Replicas) -> None:
    victim = replicas.servers[1]
    returned: list[x509.Certificate] = []
    stop = asyncio.Event()
    loops = [
        asyncio.create_task(_issue_until_stopped(replicas, victim, returned, stop))
        for _ in range(8)
    ]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while len(returned) < 40:
        assert loop.time() < deadline, f"only {len(returned)} certificates under load"
        await asyncio.sleep(0.01)
    victim.process.send_signal(signal.SIGKILL)  # mid-flight: requests are in progress
    await victim.process.wait()
    stop.set()
    await asyncio.gather(*loops)
    store = Store(replicas.database_url)
    try:
        missing = [
            cert.serial_number
            for cert in returned
            if store.issued_certificate(
                f"{cert.serial_number:x}", cert.public_bytes(Encoding.PEM).decode()
            )
            is None
        ]
    finally:
        store.close()
    assert not missing, f"{len(missing)} of {len(returned)} returned certificates have no row"
    code, out, err = await run_meshca(
        "admin", "ledger", "verify", "--database-url", replicas.database_url
    )
    assert code == 0, out + err
    # The survivor goes on issuing, and the chain still verifies after it appends.
    channel = replicas.channel(replicas.servers[0])
    try:
        await create_certificate(
            channel, make_csr()[1], token=replicas.kube.mint_token("shop", "cart")
        )
    finally:
        await channel.close()
    code, out, err = await run_meshca(
        "admin", "ledger", "verify", "--database-url", replicas.database_url
    )
    assert code == 0, out + err


async def _refused(channel: grpc.aio.Channel, token: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await create_certificate(channel, make_csr()[1], token=token)
    return info.value


async def test_a_single_use_token_spent_at_one_replica_is_refused_at_the_other(
    replicas: Replicas,
) -> None:
    first, second = (replicas.channel(s) for s in replicas.servers)
    try:
        gce_token = replicas.google.mint(identity_claims(GceVm(), AUDIENCE))
        chain = await create_certificate(first, make_csr()[1], token=gce_token)
        assert uri_sans(load_chain(chain)[0]) == ["spiffe://cluster.local/vm/web-1"]
        refusal = await _refused(second, gce_token)
        assert refusal.code() == grpc.StatusCode.UNAUTHENTICATED

        code, out, err = await run_meshca(
            *("admin", "join-token", "create", "--spiffe-id", "/vm/db-1", "--output", "json"),
            "--database-url",
            replicas.database_url,
        )
        assert code == 0, err
        join_token = yaml.safe_load(out)[0]["token"]
        chain = await create_certificate(second, make_csr()[1], token=join_token)
        assert uri_sans(load_chain(chain)[0]) == ["spiffe://cluster.local/vm/db-1"]
        refusal = await _refused(first, join_token)
        assert refusal.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "used" in (refusal.details() or "")
    finally:
        await first.close()
        await second.close()


async def test_the_bundle_writer_fails_over_to_the_survivor(replicas: Replicas) -> None:
    objects = replicas.objects
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while objects.lease(*LEASE) is None or any(
        objects.configmap(ns, "istio-ca-root-cert") is None for ns in objects.namespaces
    ):
        assert loop.time() < deadline, "no bundle ConfigMaps written"
        await asyncio.sleep(0.05)
    lease = objects.lease(*LEASE)
    assert lease is not None
    holder = lease["spec"]["holderIdentity"]
    host = socket.gethostname()
    by_identity = {f"{host}:{s.process.pid}": s for s in replicas.servers}
    assert holder in by_identity, f"{holder} is not one of {list(by_identity)}"
    killed = by_identity[holder]
    killed.process.send_signal(signal.SIGKILL)  # no clean stop: the Lease is not released
    await killed.process.wait()
    objects.add_namespace("after-failover")
    (survivor,) = [s for s in replicas.servers if s is not killed]
    deadline = loop.time() + 20
    while objects.configmap("after-failover", "istio-ca-root-cert") is None:
        assert loop.time() < deadline, "the survivor did not take over the writing"
        await asyncio.sleep(0.05)
    lease = objects.lease(*LEASE)
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == f"{host}:{survivor.process.pid}"
    written = objects.configmap("after-failover", "istio-ca-root-cert")
    assert written is not None
    assert written["data"]["root-cert.pem"] == replicas.root_pem.decode()
    with contextlib.suppress(ProcessLookupError):
        killed.process.kill()
