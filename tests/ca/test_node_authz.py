"""Node authorization end to end: a CA over gRPC, tokens from the fake Kubernetes issuer,
pods from the fake API server; a node agent asks for the identities of pods on its node."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import struct_pb2

from meshca.api._proto import istioca_pb2, istioca_pb2_grpc, meshca_pb2, meshca_pb2_grpc
from meshca.config import load_settings
from meshca.server import RunningServer, start_server
from tests.fakes.kube import FakeKubeApi
from tests.fakes.kube_pods import FakePodsApi, PodTable
from tests.support import load_chain, make_csr, tls_channel, uri_sans, verify_with_cryptography

TD = "cluster.local"
AGENT_NS, AGENT_SA = "meshca-system", "meshca-agent"
AGENT_ID = f"spiffe://{TD}/ns/{AGENT_NS}/sa/{AGENT_SA}"
WEB_ID = f"spiffe://{TD}/ns/shop/sa/web"
DB_ID = f"spiffe://{TD}/ns/shop/sa/db"


@dataclass
class Cluster:
    server: RunningServer
    kube: FakeKubeApi
    pods: PodTable
    api: FakePodsApi
    channel: grpc.aio.Channel

    def agent_token(self, pod: str = "agent-a", **kwargs: Any) -> str:
        return self.kube.mint_token(
            AGENT_NS, AGENT_SA, pod_name=pod, pod_uid=self.pods.uid(AGENT_NS, pod), **kwargs
        )

    async def ask(self, token: str, identity: str | None, csr_id: str | None = None) -> list[str]:
        """Istio's CreateCertificate with ``metadata.ImpersonatedIdentity``."""
        stub = istioca_pb2_grpc.IstioCertificateServiceStub(self.channel)
        request = istioca_pb2.IstioCertificateRequest(csr=make_csr(csr_id or identity)[1])
        if identity is not None:
            metadata = struct_pb2.Struct()
            metadata.update({"ImpersonatedIdentity": identity})
            request.metadata.CopyFrom(metadata)
        response = await stub.CreateCertificate(
            request, metadata=[("authorization", f"Bearer {token}")], timeout=10
        )
        return list(response.cert_chain)

    async def refused(self, token: str, identity: str | None, **kw: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await self.ask(token, identity, **kw)
        return info.value

    async def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.server.http_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            return await resp.text()


async def _start(tmp_path: Path, **node_agents: Any) -> AsyncIterator[Cluster]:
    table = PodTable()
    table.add(AGENT_NS, "agent-a", service_account=AGENT_SA, node="node-a")
    table.add(AGENT_NS, "agent-b", service_account=AGENT_SA, node="node-b")
    table.add("shop", "web-1", service_account="web", node="node-a")
    table.add("shop", "db-1", service_account="db", node="node-b")
    token_file = tmp_path / "pods-token"
    token_file.write_text("meshca-pods\n")
    async with FakeKubeApi() as kube, FakePodsApi(table) as api:
        config: dict[str, Any] = {
            "service_accounts": [f"{AGENT_NS}/{AGENT_SA}"],
            "api_server": api.url,
            "credentials_file": token_file,
            "pod_cache_ttl": "60s",
            "min_refresh_interval": "100ms",
        }
        config.update(node_agents)
        settings = load_settings(
            state_dir=tmp_path / "state",
            grpc_listen="127.0.0.1:0",
            grpc_mtls_listen="off",
            http_listen="127.0.0.1:0",
            k8s_oidc_issuer=kube.issuer,
            node_agents=config,
        )
        server = await start_server(settings)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.http_port}/v1/bundle"
            async with session.get(url) as resp:
                root_pem = await resp.read()
        channel = tls_channel(f"127.0.0.1:{server.grpc_port}", root_pem)
        try:
            yield Cluster(server, kube, table, api, channel)
        finally:
            await channel.close()
            await server.stop(grace=0)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async for started in _start(tmp_path):
        yield started


async def test_a_node_agent_gets_the_identity_of_a_pod_on_its_node(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshca.audit")
    chain = await cluster.ask(cluster.agent_token("agent-a"), WEB_ID)
    leaf = verify_with_cryptography(chain)
    assert uri_sans(leaf) == [WEB_ID]

    store = cluster.server.store
    row = store.issued_certificate(f"{leaf.serial_number:x}", chain[0])
    assert row is not None
    assert (row.spiffe_id, row.agent_spiffe_id, row.node_name) == (WEB_ID, AGENT_ID, "node-a")
    web_uid = cluster.pods.uid("shop", "web-1")
    assert f"k8s:pod-uid:{web_uid}" in row.evidence
    assert "k8s:agent-pod-name:agent-a" in row.evidence
    assert store.verify_ledger().ok
    audit = [r.getMessage() for r in caplog.records if r.name == "meshca.audit"]
    assert any(
        f"{WEB_ID} serial" in m and f"for node agent {AGENT_ID} on node node-a" in m for m in audit
    ), audit


async def test_the_meshca_api_names_the_identity_in_a_header(cluster: Cluster) -> None:
    stub = meshca_pb2_grpc.MeshCertificateServiceStub(cluster.channel)
    request = meshca_pb2.MeshCertificateRequest(
        request_id=str(uuid.uuid4()), csr=make_csr(DB_ID)[1]
    )
    response = await stub.CreateCertificate(
        request,
        metadata=[
            ("authorization", f"Bearer {cluster.agent_token('agent-b')}"),
            ("meshca-impersonated-identity", DB_ID),
        ],
        timeout=10,
    )
    assert uri_sans(load_chain(response.cert_chain)[0]) == [DB_ID]


async def test_a_pod_on_node_a_cannot_get_an_identity_that_runs_only_on_node_b(
    cluster: Cluster,
) -> None:
    before = cluster.server.store.counts().issued
    err = await cluster.refused(cluster.agent_token("agent-a"), DB_ID)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no running pod with service account db in namespace shop" in (err.details() or "")
    assert "node-a" in (err.details() or "")
    assert cluster.server.store.counts().issued == before
    metrics = await cluster.metrics()
    assert 'meshca_requests_refused_total{api="istio",reason="identity_not_on_node"} 1.0' in metrics


async def test_a_non_agent_service_account_cannot_impersonate(cluster: Cluster) -> None:
    cluster.pods.add("shop", "web-2", service_account="web", node="node-a")
    token = cluster.kube.mint_token(
        "shop", "web", pod_name="web-2", pod_uid=cluster.pods.uid("shop", "web-2")
    )
    err = await cluster.refused(token, f"spiffe://{TD}/ns/shop/sa/web-admin")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may not obtain other identities" in (err.details() or "")
    # A workload asking for its own identity this way is simply issued it.
    chain = await cluster.ask(token, WEB_ID)
    assert uri_sans(load_chain(chain)[0]) == [WEB_ID]
    metrics = await cluster.metrics()
    assert 'meshca_requests_refused_total{api="istio",reason="not_a_node_agent"} 1.0' in metrics


async def test_the_agents_own_pod_is_checked(cluster: Cluster) -> None:
    token = cluster.agent_token("agent-a")
    # The pod the token was bound to was replaced by one with the same name.
    cluster.pods.add(AGENT_NS, "agent-a", service_account=AGENT_SA, node="node-a")
    err = await cluster.refused(token, WEB_ID)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "agent-a is now uid" in (err.details() or "")

    unbound = cluster.kube.mint_token(AGENT_NS, AGENT_SA, bound_to_pod=False)
    err = await cluster.refused(unbound, WEB_ID)
    assert "not bound to a pod" in (err.details() or "")

    cluster.pods.delete(AGENT_NS, "agent-b")
    err = await cluster.refused(
        cluster.kube.mint_token(AGENT_NS, AGENT_SA, pod_name="agent-b", pod_uid=str(uuid.uuid4())),
        DB_ID,
    )
    assert "does not exist" in (err.details() or "")

    metrics = await cluster.metrics()
    for reason in ("agent_pod_replaced", "agent_token_not_pod_bound", "agent_pod_gone"):
        assert f'meshca_requests_refused_total{{api="istio",reason="{reason}"}} 1.0' in metrics


async def test_a_token_naming_another_node_is_refused(cluster: Cluster) -> None:
    uid = cluster.pods.uid(AGENT_NS, "agent-a")
    claims = {
        "kubernetes.io": {
            "namespace": AGENT_NS,
            "serviceaccount": {"name": AGENT_SA, "uid": str(uuid.uuid4())},
            "pod": {"name": "agent-a", "uid": uid},
            "node": {"name": "node-b", "uid": str(uuid.uuid4())},
        }
    }
    token = cluster.kube.mint_token(AGENT_NS, AGENT_SA, claims=claims)
    err = await cluster.refused(token, DB_ID)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "names node node-b, but the pod is scheduled on node-a" in (err.details() or "")


async def test_finished_pods_give_no_identity_and_pending_ones_do(cluster: Cluster) -> None:
    cluster.pods.add("batch", "job-1", service_account="job", node="node-a", phase="Succeeded")
    job = f"spiffe://{TD}/ns/batch/sa/job"
    err = await cluster.refused(cluster.agent_token("agent-a"), job)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # A native sidecar asks while its pod is still Pending (a miss refreshes the list).
    cluster.pods.add("batch", "job-2", service_account="job", node="node-a", phase="Pending")
    await asyncio.sleep(0.15)
    chain = await cluster.ask(cluster.agent_token("agent-a"), job)
    assert uri_sans(load_chain(chain)[0]) == [job]


async def test_the_csr_must_name_the_impersonated_identity(cluster: Cluster) -> None:
    before = cluster.server.store.counts().issued
    err = await cluster.refused(cluster.agent_token("agent-a"), WEB_ID, csr_id=AGENT_ID)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert cluster.server.store.counts().issued == before


async def test_only_kubernetes_workload_ids_and_this_trust_domain(cluster: Cluster) -> None:
    token = cluster.agent_token("agent-a")
    for identity, needle in (
        (f"spiffe://{TD}/vm/web", "only Kubernetes workload identities"),
        ("spiffe://other.example/ns/shop/sa/web", "not a workload in trust domain"),
        ("https://example.com/x", "not a SPIFFE ID"),
    ):
        err = await cluster.refused(token, identity, csr_id=WEB_ID)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, identity
        assert needle in (err.details() or ""), (identity, err.details())


async def test_bad_impersonation_fields_are_invalid_arguments(cluster: Cluster) -> None:
    stub = istioca_pb2_grpc.IstioCertificateServiceStub(cluster.channel)
    metadata = struct_pb2.Struct()
    metadata.update({"ImpersonatedIdentity": 42})
    token = cluster.agent_token("agent-a")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateCertificate(
            istioca_pb2.IstioCertificateRequest(csr=make_csr(WEB_ID)[1], metadata=metadata),
            metadata=[("authorization", f"Bearer {token}")],
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be a SPIFFE ID as a string" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateCertificate(
            istioca_pb2.IstioCertificateRequest(csr=make_csr(WEB_ID)[1]),
            metadata=[
                ("authorization", f"Bearer {token}"),
                ("meshca-impersonated-identity", WEB_ID),
            ],
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ImpersonatedIdentity" in (info.value.details() or "")


async def test_an_unreachable_api_server_is_unavailable_not_allowed(cluster: Cluster) -> None:
    cluster.api.down = True
    err = await cluster.refused(cluster.agent_token("agent-a"), WEB_ID)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "retry later" in (err.details() or "")
    assert "503" not in (err.details() or "")  # the details are for the CA's log


async def test_a_deleted_pods_identity_is_refused_after_the_cache_refresh(
    tmp_path: Path,
) -> None:
    async for cluster in _start(tmp_path, pod_cache_ttl="300ms", min_refresh_interval="100ms"):
        token = cluster.agent_token("agent-a")
        await cluster.ask(token, WEB_ID)
        calls = len(cluster.api.requests)
        await cluster.ask(token, WEB_ID)  # answered from the cache
        assert len(cluster.api.requests) == calls
        cluster.pods.delete("shop", "web-1")
        await asyncio.sleep(0.4)
        err = await cluster.refused(token, WEB_ID)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "no running pod with service account web" in (err.details() or "")
        # A new pod is found at once (a miss asks again), without waiting for the TTL.
        cluster.pods.add("shop", "web-3", service_account="web", node="node-a")
        await asyncio.sleep(0.15)
        await cluster.ask(token, WEB_ID)


async def test_static_delegations_for_agents_outside_kubernetes(tmp_path: Path) -> None:
    vm_agent = f"spiffe://{TD}/ns/vms/sa/host-1"
    delegations = [{"agent": vm_agent, "spiffe_ids": [f"spiffe://{TD}/vm/host-1/nginx"]}]
    async for cluster in _start(tmp_path, delegations=delegations):
        token = cluster.kube.mint_token("vms", "host-1", bound_to_pod=False)
        chain = await cluster.ask(token, f"spiffe://{TD}/vm/host-1/nginx")
        leaf = load_chain(chain)[0]
        row = cluster.server.store.issued_certificate(f"{leaf.serial_number:x}", chain[0])
        assert row is not None
        assert (row.agent_spiffe_id, row.node_name) == (vm_agent, None)
        err = await cluster.refused(token, f"spiffe://{TD}/vm/host-1/postgres")
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not among the identities node_agents.delegations lists" in (err.details() or "")
