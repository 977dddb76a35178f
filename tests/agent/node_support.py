"""A node for node-agent tests: a CA that trusts node agents, the fake API server's and
kubelet's pods, a proc root of fixtures, and workload processes that really connect.

Every workload is a real process started by the test (``exec_when_placed.py`` then
py-spiffe's client or an SDS client); the agent learns its pid from the kernel
(``SO_PEERCRED``) and reads the cgroup fixture the test wrote for that pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshca.agent.config import load_agent_settings
from meshca.agent.node import RunningNodeAgent, start_node_agent
from tests.agent.conftest import CA, StartCA
from tests.fakes.kube_pods import FakeKubelet, FakePodsApi, PodTable

ROOT = Path(__file__).resolve().parents[2]
PLACER = Path(__file__).with_name("exec_when_placed.py")
WLAPI_CLIENT = Path(__file__).with_name("wlapi_client.py")
AGENT_NS, AGENT_SA = "meshca-system", "meshca-agent"
TD = "cluster.local"
WAIT = 20.0


def systemd_cgroup(pod_uid: str, container_id: str) -> str:
    """A cgroup v2 line as the systemd driver and containerd write it."""
    escaped = pod_uid.replace("-", "_")
    return (
        "0::/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{escaped}.slice/cri-containerd-{container_id}.scope\n"
    )


@dataclass
class Node:
    ca: CA
    table: PodTable
    api: FakePodsApi
    kubelet: FakeKubelet
    proc_root: Path
    sockets: Path
    workdir: Path
    agents: list[RunningNodeAgent] = field(default_factory=list)

    @property
    def wlapi(self) -> Path:
        return self.sockets / "wl.sock"

    @property
    def sds(self) -> Path:
        return self.sockets / "sds.sock"

    def place(self, pid: int, cgroup: str, exe: str | None = None) -> None:
        """Write the /proc fixtures of ``pid``; ``placed`` last."""
        directory = self.proc_root / str(pid)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup").write_text(cgroup)
        if exe is not None:
            (directory / "exe").unlink(missing_ok=True)
            (directory / "exe").symlink_to(exe)
        (directory / "placed").write_text("")

    def place_in_pod(self, pid: int, namespace: str, name: str) -> None:
        uid = self.table.uid(namespace, name)
        self.place(pid, systemd_cgroup(uid, self.table.container_id(namespace, name)))

    async def start_agent(self, **overrides: Any) -> RunningNodeAgent:
        token = self.workdir / "agent-token"
        token.write_text(
            self.ca.kube.mint_token(
                AGENT_NS,
                AGENT_SA,
                pod_name="agent-a",
                pod_uid=self.table.uid(AGENT_NS, "agent-a"),
            )
        )
        kubelet_token = self.workdir / "kubelet-token"
        kubelet_token.write_text("meshca-agent-token\n")
        root = self.workdir / "ca-root.pem"
        root.write_bytes(self.ca.root_pem)
        options: dict[str, Any] = {
            "ca_address": self.ca.address,
            "ca_trust_bundle": root,
            "ca_server_name": "localhost",
            "backoff_initial": "100ms",
            "backoff_max": "1s",
            "request_timeout": "5s",
            "token_file": token,
            "attestation": "k8s",
            "kubelet_url": self.kubelet.url,
            "kubelet_ca_file": self.kubelet.ca_file,
            "kubelet_token_file": kubelet_token,
            "proc_root": self.proc_root,
            "workload_api_socket": self.wlapi,
            "sds_socket": self.sds,
            "socket_mode": 0o666,
            "attestation_timeout": "2s",
            "identity_idle_grace": "0s",
        }
        options.update(overrides)
        agent = await start_node_agent(load_agent_settings(**options))
        self.agents.append(agent)
        await asyncio.wait_for(agent.wait_ready(), WAIT)
        return agent

    async def workload(self, *program: str, place: Any) -> dict[str, Any]:
        """Run ``program`` (python arguments) as a workload process; ``place(pid)``
        writes its fixtures. Returns the JSON it prints last."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PLACER),
            str(self.proc_root),
            str(WAIT),
            *program,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            place(proc.pid)
            out, err = await asyncio.wait_for(proc.communicate(), WAIT * 2)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        lines = [line for line in out.decode().splitlines() if line.strip()]
        assert lines, f"the workload printed nothing (exit {proc.returncode}): {err.decode()}"
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    async def py_spiffe(self, place: Any) -> dict[str, Any]:
        return await self.workload(str(WLAPI_CLIENT), "fetch", str(self.wlapi), "10", place=place)

    async def envoy(self, place: Any) -> dict[str, Any]:
        return await self.workload("-m", "tests.agent.sds_fetch", str(self.sds), "10", place=place)


async def node(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Node]:
    """A CA trusting ``meshca-system/meshca-agent``, pods agent-a, web-1 and db-1 on
    node-a, and pod db-2 on node-b."""
    table = PodTable()
    table.add(AGENT_NS, "agent-a", service_account=AGENT_SA, node="node-a")
    table.add("shop", "web-1", service_account="web", node="node-a")
    table.add("shop", "db-1", service_account="db", node="node-a")
    table.add("shop", "db-2", service_account="db", node="node-b")
    sockets = Path(tempfile.mkdtemp(prefix="node-"))  # short: the socket path limit
    pods_token = tmp_path / "pods-token"
    pods_token.write_text("meshca-pods")
    async with FakePodsApi(table) as api, FakeKubelet(table, "node-a", tmp_path / "kubelet") as kl:
        ca = await start_ca(
            node_agents={
                "service_accounts": [f"{AGENT_NS}/{AGENT_SA}"],
                "api_server": api.url,
                "credentials_file": pods_token,
                "min_refresh_interval": "100ms",
            }
        )
        proc_root = tmp_path / "proc"
        proc_root.mkdir()
        env = Node(ca, table, api, kl, proc_root, sockets, tmp_path)
        try:
            yield env
        finally:
            for agent in env.agents:
                await agent.stop()
            shutil.rmtree(sockets, ignore_errors=True)


def own_pid_placed_as(env: Node, cgroup: str) -> None:
    """The test process itself as a caller (in-process gRPC clients)."""
    env.place(os.getpid(), cgroup)
