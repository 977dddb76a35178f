"""One agent per node: what node authorization costs the CA, and what telling callers
apart costs the agent, over loopback.

    .venv/bin/python bench/node.py [--requests 300] [--callers 200] [--pod-cache-ttl 5s]
                                   [--json]

1. In this process: a fake Kubernetes API (tests/fakes/kube.py: it mints projected
   tokens, verified locally against its JWKS), the fake API server's and kubelet's pods
   (tests/fakes/kube_pods.py: the agent's pod and 20 workload pods on node-a), and a
   meshca CA (``meshca.server.start_server``: JWT mode, gRPC over TLS on 127.0.0.1,
   SQLite ledger, ``node_agents`` trusting the agent's service account, rate limits off).
2. CA: ``--requests`` sequential Istio CreateCertificate calls (a fresh P-256 CSR each)
   with a workload's own token, then as many by the node agent naming a workload of its
   node (``ImpersonatedIdentity``), cycling through the 20 workloads. With the default
   pod cache TTL (5s) nearly every impersonated request is answered from the cache;
   ``--pod-cache-ttl 1ms`` makes each one read the agent's pod and the node's pods from
   the (fake, loopback) API server. The API server's pod reads are counted. Latency
   percentiles per kind; the difference of the medians is what node authorization adds
   to a request.
3. Agent: a node agent (``attestation: k8s``, in this process) with its Workload API
   socket; ``--callers`` sequential connections from this process (its cgroup fixture
   names a workload pod), each a FetchX509SVID until the first message. The first takes
   the CA round trip; the others are served the certificate the agent holds: relay,
   SO_PEERCRED, the cgroup file, the kubelet list (cached) and the stream.

The report goes to stdout; with ``--json`` one JSON object goes to stdout instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))  # for the tests package (fakes)

import aiohttp  # noqa: E402
import grpc  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

from meshca.agent.config import load_agent_settings  # noqa: E402
from meshca.agent.node import start_node_agent  # noqa: E402
from meshca.api._proto import (  # noqa: E402
    istioca_pb2,
    istioca_pb2_grpc,
    workload_pb2,
    workload_pb2_grpc,
)
from meshca.config import load_settings  # noqa: E402
from meshca.durations import parse_duration  # noqa: E402
from meshca.server import start_server  # noqa: E402
from tests.fakes.kube import FakeKubeApi  # noqa: E402
from tests.fakes.kube_pods import FakeKubelet, FakePodsApi, PodTable  # noqa: E402

TD = "cluster.local"
WORKLOADS = 20


def csr(spiffe_id: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p90_ms": pick(0.90) * 1000,
        "p99_ms": pick(0.99) * 1000,
        "max_ms": ordered[-1] * 1000,
    }


async def run(requests: int, callers: int, ttl: str, workdir: Path) -> dict[str, Any]:
    table = PodTable()
    agent_pod = table.add("meshca-node", "agent-a", service_account="meshca-agent")
    for n in range(WORKLOADS):
        table.add("shop", f"app{n}-1", service_account=f"app{n}")
    (workdir / "pods-token").write_text("meshca-pods")
    async with (
        FakeKubeApi() as kube,
        FakePodsApi(table) as pods,
        FakeKubelet(table, "node-a", workdir / "kubelet") as kubelet,
    ):
        settings = load_settings(
            state_dir=workdir / "ca",
            grpc_listen="127.0.0.1:0",
            grpc_mtls_listen="off",
            http_listen="127.0.0.1:0",
            k8s_oidc_issuer=kube.issuer,
            rate_limit_per_peer="off",
            rate_limit_per_identity="off",
            node_agents={
                "service_accounts": ["meshca-node/meshca-agent"],
                "api_server": pods.url,
                "credentials_file": workdir / "pods-token",
                "pod_cache_ttl": ttl,
                "min_refresh_interval": ttl if parse_duration(ttl) < timedelta(seconds=1) else "1s",
            },
        )
        server = await start_server(settings)
        try:
            url = f"http://127.0.0.1:{server.http_port}/v1/bundle"
            async with aiohttp.ClientSession() as session, session.get(url) as resp:
                root_pem = await resp.read()
            ca = await measure_ca(server.grpc_port, root_pem, kube, table, pods, requests)
            agent = await measure_agent(
                server.grpc_port, root_pem, kube, table, kubelet, workdir, callers
            )
        finally:
            await server.stop(grace=0)
    del agent_pod
    return {"ca": ca, "agent": agent}


async def measure_ca(
    port: int,
    root_pem: bytes,
    kube: FakeKubeApi,
    table: PodTable,
    pods: FakePodsApi,
    requests: int,
) -> dict[str, Any]:
    credentials = grpc.ssl_channel_credentials(root_certificates=root_pem)
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as ch:
        stub = istioca_pb2_grpc.IstioCertificateServiceStub(ch)
        agent_token = kube.mint_token(
            "meshca-node",
            "meshca-agent",
            pod_name="agent-a",
            pod_uid=table.uid("meshca-node", "agent-a"),
        )
        own_tokens = [kube.mint_token("shop", f"app{n}") for n in range(WORKLOADS)]
        ids = [f"spiffe://{TD}/ns/shop/sa/app{n}" for n in range(WORKLOADS)]
        csrs = [csr(ids[i % WORKLOADS]) for i in range(requests)]  # made before timing

        async def call(i: int, impersonate: bool) -> float:
            request = istioca_pb2.IstioCertificateRequest(csr=csrs[i])
            token = own_tokens[i % WORKLOADS]
            if impersonate:
                metadata = struct_pb2.Struct()
                metadata.update({"ImpersonatedIdentity": ids[i % WORKLOADS]})
                request.metadata.CopyFrom(metadata)
                token = agent_token
            started = time.perf_counter()
            await stub.CreateCertificate(
                request, metadata=[("authorization", f"Bearer {token}")], timeout=10
            )
            return time.perf_counter() - started

        for i in range(min(20, requests)):  # warm: token cache, pod cache, channel
            await call(i, False)
            await call(i, True)
        reads_before = len(pods.requests)
        own = [await call(i, False) for i in range(requests)]
        delegated = [await call(i, True) for i in range(requests)]
        pod_reads = len(pods.requests) - reads_before
    return {
        "requests": requests,
        "own_token": percentiles(own),
        "node_agent": percentiles(delegated),
        "api_server_pod_reads": pod_reads,
    }


async def measure_agent(
    port: int,
    root_pem: bytes,
    kube: FakeKubeApi,
    table: PodTable,
    kubelet: FakeKubelet,
    workdir: Path,
    callers: int,
) -> dict[str, Any]:
    (workdir / "agent-token").write_text(
        kube.mint_token(
            "meshca-node",
            "meshca-agent",
            pod_name="agent-a",
            pod_uid=table.uid("meshca-node", "agent-a"),
        )
    )
    (workdir / "kubelet-token").write_text("meshca-agent-token")
    (workdir / "root.pem").write_bytes(root_pem)
    proc_root = workdir / "proc"
    me = proc_root / str(os.getpid())
    me.mkdir(parents=True)
    uid, container = table.uid("shop", "app0-1"), table.container_id("shop", "app0-1")
    (me / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/"
        f"cri-containerd-{container}.scope\n"
    )
    sockets = Path(tempfile.mkdtemp(prefix="bench-node-"))
    agent = await start_node_agent(
        load_agent_settings(
            ca_address=f"127.0.0.1:{port}",
            ca_trust_bundle=workdir / "root.pem",
            ca_server_name="localhost",
            token_file=workdir / "agent-token",
            attestation="k8s",
            kubelet_url=kubelet.url,
            kubelet_ca_file=kubelet.ca_file,
            kubelet_token_file=workdir / "kubelet-token",
            proc_root=proc_root,
            workload_api_socket=sockets / "wl.sock",
            socket_mode=0o666,
        )
    )
    try:
        await agent.wait_ready()
        samples = []
        for _ in range(callers):
            started = time.perf_counter()
            async with grpc.aio.insecure_channel(f"unix:{sockets / 'wl.sock'}") as channel:
                stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
                call = stub.FetchX509SVID(
                    workload_pb2.X509SVIDRequest(),
                    metadata=(("workload.spiffe.io", "true"),),
                    timeout=10,
                )
                async for _ in call:
                    call.cancel()
                    break
            samples.append(time.perf_counter() - started)
        kubelet_requests = kubelet.requests.count("/pods")
    finally:
        await agent.stop()
    return {
        "callers": callers,
        "first_caller_ms": samples[0] * 1000,
        "later_callers": percentiles(samples[1:]),
        "kubelet_requests": kubelet_requests,
    }


def report(result: dict[str, Any], command: str) -> str:
    ca, agent = result["ca"], result["agent"]
    own, node = ca["own_token"], ca["node_agent"]

    def line(name: str, p: dict[str, float]) -> str:
        return (
            f"  {name:<28} p50 {p['p50_ms']:6.2f} ms  p90 {p['p90_ms']:6.2f}  "
            f"p99 {p['p99_ms']:6.2f}  max {p['max_ms']:6.2f}"
        )

    lines = [
        f"command: {command}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"CA, {ca['requests']} sequential CreateCertificate calls of each kind:",
        line("workload's own token", own),
        line("node agent, impersonating", node),
        f"  node authorization adds {node['p50_ms'] - own['p50_ms']:.2f} ms at the median; "
        f"{ca['api_server_pod_reads']} pod reads from the API server in all",
        f"agent, {agent['callers']} sequential Workload API callers (one process):",
        f"  first caller (CA round trip)   {agent['first_caller_ms']:.2f} ms",
        line("later callers (held SVID)", agent["later_callers"]),
        f"  kubelet /pods requests: {agent['kubelet_requests']}",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--callers", type=int, default=200)
    parser.add_argument("--pod-cache-ttl", default="5s", help="the CA's node_agents.pod_cache_ttl")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    command = " ".join(["python", *sys.argv])
    with tempfile.TemporaryDirectory(prefix="meshca-bench-node-") as tmp:
        result = asyncio.run(run(args.requests, args.callers, args.pod_cache_ttl, Path(tmp)))
    if args.json:
        print(json.dumps({"command": command, **result}, indent=2))
    else:
        print(report(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
