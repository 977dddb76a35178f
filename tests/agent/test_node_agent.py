"""One agent for the whole node: each workload process that calls the Workload API or
SDS socket gets the SVID of its own pod's service account, obtained by the agent from the
CA on the pod's behalf. Workloads are real processes (py-spiffe, an Envoy-like SDS
client); the agent learns who they are from the kernel (SO_PEERCRED), their cgroup
fixture and the fake kubelet."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from meshca.agent._caller_socket import Caller, peer_caller
from meshca.agent.config import load_agent_settings
from meshca.agent.workload_api import HEADER
from meshca.api._proto import workload_pb2, workload_pb2_grpc
from meshca.errors import ConfigError
from meshca.spiffe import SpiffeId
from tests.agent.conftest import StartCA
from tests.agent.node_support import TD, Node, node, own_pid_placed_as, systemd_cgroup
from tests.fakes.kube_pods import PodTable

WEB = f"spiffe://{TD}/ns/shop/sa/web"
DB = f"spiffe://{TD}/ns/shop/sa/db"
AGENT = f"spiffe://{TD}/ns/meshca-system/sa/meshca-agent"


@pytest.fixture
async def env(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Node]:
    async for started in node(start_ca, tmp_path):
        yield started


async def fetch_in_process(socket_path: Path) -> workload_pb2.X509SVIDResponse:
    """The first FetchX509SVID message, with meshca's own stubs (this process calls)."""
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        call = stub.FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=((HEADER, "true"),), timeout=10
        )
        async for message in call:
            call.cancel()
            return message
    raise AssertionError("the stream ended without a message")


async def test_two_workloads_each_get_their_own_svid_over_the_workload_api(env: Node) -> None:
    agent = await env.start_agent()
    web, db = await asyncio.gather(
        env.py_spiffe(lambda pid: env.place_in_pod(pid, "shop", "web-1")),
        env.py_spiffe(lambda pid: env.place_in_pod(pid, "shop", "db-1")),
    )
    assert "error" not in web and "error" not in db, (web, db)
    assert web["svid"]["spiffe_id"] == WEB and web["svid"]["key_matches_leaf"]
    assert db["svid"]["spiffe_id"] == DB and db["svid"]["key_matches_leaf"]
    assert web["context"]["chain_verifies"] is True
    assert sorted(map(str, agent.pool.identities())) == [DB, WEB]
    assert agent.readiness().status == 200
    assert agent.readiness().body == b"ready\nserving 2 identities\n"
    assert agent.status_line().startswith(
        f"meshca node agent ready: attestation k8s, serving pods of this node (kubelet "
        f"{env.kubelet.url})"
    )
    # The CA's ledger says who asked, and on which node.
    rows = env.ca.running.store.list_ledger(spiffe_id=WEB)
    assert [(r.agent_spiffe_id, r.node_name) for r in rows] == [(AGENT, "node-a")]


async def test_two_workloads_each_get_their_own_secrets_over_sds(env: Node) -> None:
    await env.start_agent()
    web, db = await asyncio.gather(
        env.envoy(lambda pid: env.place_in_pod(pid, "shop", "web-1")),
        env.envoy(lambda pid: env.place_in_pod(pid, "shop", "db-1")),
    )
    assert (web.get("spiffe_id"), db.get("spiffe_id")) == (WEB, DB), (web, db)
    assert web["key_matches_leaf"] and db["key_matches_leaf"]
    assert web["roots"] == db["roots"] == 1


async def test_pods_with_one_identity_share_one_certificate(env: Node) -> None:
    env.table.add("shop", "web-2", service_account="web", node="node-a")
    agent = await env.start_agent()
    first = await env.py_spiffe(lambda pid: env.place_in_pod(pid, "shop", "web-1"))
    second = await env.envoy(lambda pid: env.place_in_pod(pid, "shop", "web-2"))
    assert first["svid"]["spiffe_id"] == second["spiffe_id"] == WEB
    assert first["svid"]["serial"] == second["serial"]
    assert len(env.ca.running.store.list_ledger(spiffe_id=WEB)) == 1
    assert len(agent.pool) == 1


async def test_a_process_in_no_pod_waits_then_is_refused(env: Node) -> None:
    agent = await env.start_agent(attestation_timeout="500ms")
    own_pid_placed_as(env, "0::/system.slice/sshd.service\n")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await fetch_in_process(env.wlapi)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = info.value.details() or ""
    assert f"process {os.getpid()}" in details
    assert "runs in no Kubernetes pod; waited 0.5s" in details
    metrics = agent.metrics.exposition().decode()
    assert 'meshca_agent_callers_refused_total{reason="caller_not_in_a_known_pod"} 1.0' in metrics


async def test_a_pod_the_kubelet_lists_late_is_served_once_listed(env: Node) -> None:
    agent = await env.start_agent(attestation_timeout="5s")
    pod = env.table.add("shop", "late-1", service_account="late", node="node-a")
    env.table.delete("shop", "late-1")  # scheduled, not yet known to the kubelet
    container = pod["status"]["containerStatuses"][0]["containerID"].split("://")[1]
    own_pid_placed_as(env, systemd_cgroup(pod["metadata"]["uid"], container))

    async def list_it_later() -> None:
        await asyncio.sleep(0.5)
        env.table.pods[("shop", "late-1")] = pod

    later = asyncio.create_task(list_it_later())
    message = await fetch_in_process(env.wlapi)
    await later
    assert message.svids[0].spiffe_id == f"spiffe://{TD}/ns/shop/sa/late"
    assert env.kubelet.requests.count("/pods") >= 2
    assert agent.kubelet is not None


async def test_a_container_the_pod_does_not_have_is_refused(env: Node) -> None:
    await env.start_agent(attestation_timeout="300ms")
    uid = env.table.uid("shop", "web-1")
    own_pid_placed_as(env, systemd_cgroup(uid, "f" * 64))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await fetch_in_process(env.wlapi)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "does not list among the containers of pod shop/web-1" in (info.value.details() or "")


async def test_a_pod_on_another_node_is_not_this_agents_to_serve(env: Node) -> None:
    """db-2 runs on node-b: this node's kubelet does not list it, so the agent never asks
    the CA (which would refuse it too: see tests/ca/test_node_authz.py)."""
    await env.start_agent(attestation_timeout="300ms")
    own_pid_placed_as(
        env,
        systemd_cgroup(env.table.uid("shop", "db-2"), env.table.container_id("shop", "db-2")),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await fetch_in_process(env.wlapi)
    assert "which the kubelet does not list" in (info.value.details() or "")
    assert env.ca.running.store.list_ledger(spiffe_id=DB) == []


async def test_identities_no_pod_uses_any_more_are_dropped(env: Node) -> None:
    agent = await env.start_agent()
    result = await env.py_spiffe(lambda pid: env.place_in_pod(pid, "shop", "web-1"))
    assert result["svid"]["spiffe_id"] == WEB
    web = SpiffeId.parse(WEB)
    assert web in agent.pool
    assert agent.pool.sweep() == []  # the pod still runs: kept
    env.table.delete("shop", "web-1")
    assert agent.kubelet is not None
    await agent.kubelet.refresh()
    assert agent.pool.sweep() == [web]
    assert web not in agent.pool


async def test_the_ca_refusing_an_identity_is_told_to_the_caller(env: Node) -> None:
    """The kubelet lists a pod the API server (the CA's view) does not have."""
    agent = await env.start_agent()
    pod = env.table.add("shop", "ghost-1", service_account="ghost", node="node-a")
    api_view = PodTable()
    api_view.pods = {k: v for k, v in env.table.pods.items() if k != ("shop", "ghost-1")}
    env.api.table = api_view
    container = pod["status"]["containerStatuses"][0]["containerID"].split("://")[1]
    own_pid_placed_as(env, systemd_cgroup(pod["metadata"]["uid"], container))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await fetch_in_process(env.wlapi)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = info.value.details() or ""
    assert f"the CA did not issue spiffe://{TD}/ns/shop/sa/ghost" in details
    assert "no running pod with service account ghost" in details
    metrics = agent.metrics.exposition().decode()
    assert 'meshca_agent_callers_refused_total{reason="identity_refused"} 1.0' in metrics


async def test_a_connection_around_the_relay_is_refused(env: Node) -> None:
    await env.start_agent()
    private = next(env.sockets.glob(".wl.sock.*/grpc"))
    async with grpc.aio.insecure_channel(f"unix:{private}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        call = stub.FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=((HEADER, "true"),), timeout=5
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "did not come through the agent's socket" in (info.value.details() or "")


async def test_the_public_sockets_are_open_to_every_pod_and_the_relay_dir_is_not(
    env: Node,
) -> None:
    stale = env.sockets / ".wl.sock.k1lled"  # what an agent killed with SIGKILL leaves
    stale.mkdir()
    (stale / "grpc").write_text("")
    await env.start_agent()
    assert not stale.exists()
    assert env.wlapi.stat().st_mode & 0o777 == 0o666
    private = [p.parent for p in env.sockets.glob(".*.sock.*/grpc")]
    assert len(private) == 2  # one per socket
    assert all(p.stat().st_mode & 0o777 == 0o700 for p in private)


def test_peer_credentials_and_the_pidfd_follow_the_real_process() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        caller = peer_caller(left)
        assert (caller.pid, caller.uid, caller.gid) == (os.getpid(), os.getuid(), os.getgid())
        assert caller.alive()
        caller.close()
    finally:
        left.close()
        right.close()
    pid = os.fork()
    if pid == 0:  # the child exits at once
        os._exit(0)
    gone = Caller(pid=pid, uid=0, gid=0, pidfd=os.pidfd_open(pid))
    os.waitpid(pid, 0)
    assert not gone.alive()
    gone.close()
    assert not Caller(pid=pid, uid=0, gid=0).alive()  # never pinned: never trusted


def test_node_mode_settings_are_checked(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "ca_address": "ca:15012",
        "ca_plaintext": True,
        "attestation": "k8s",
        "kubelet_url": "https://10.0.0.1:10250",
        "sds_socket": tmp_path / "sds.sock",
    }
    cases: list[tuple[dict[str, Any], str]] = [
        ({"kubelet_url": None}, "needs kubelet_url"),
        ({"kubelet_url": "http://10.0.0.1:10255"}, "must be https://"),
        ({"credential": "gce"}, "set credential 'k8s'"),
        ({"sds_socket": None}, "set at least one"),
        ({"output_dir": tmp_path / "out"}, "carry the agent's own identity"),
        ({"unix_workloads": ["/x uid=0"]}, "need attestation 'unix', not 'k8s'"),
        ({"attestation": "none", "unix_workloads": ["/x uid=0"]}, "need attestation 'unix'"),
    ]
    for change, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            load_agent_settings(**{**base, **change})
    settings = load_agent_settings(**base)
    assert (settings.proc_root, settings.attestation_timeout) == (
        Path("/proc"),
        timedelta(seconds=10),
    )
