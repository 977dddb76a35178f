"""Several workloads on one VM: ``attestation: unix`` maps each calling process (uid, gid,
executable) to a SPIFFE ID, and the CA's ``node_agents.delegations`` lets that agent
obtain exactly those IDs. Workloads are real processes; their executables are /proc
fixtures (``<proc_root>/<pid>/exe``)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from meshca.agent.config import load_agent_settings
from meshca.agent.node import RunningNodeAgent, start_node_agent
from meshca.authn.join_token import new_token, token_digest
from meshca.errors import ConfigError
from meshca.store import JoinToken
from tests.agent.conftest import CA, StartCA
from tests.agent.node_support import PLACER, ROOT, WLAPI_CLIENT
from tests.agent.test_node_agent import fetch_in_process

TD = "cluster.local"
HOST = f"spiffe://{TD}/vm/host-1"
WEB = f"spiffe://{TD}/vm/host-1/nginx"
DB = f"spiffe://{TD}/vm/host-1/postgres"
NGINX, POSTGRES = "/usr/sbin/nginx", "/usr/lib/postgresql/16/bin/postgres"
HOST_CGROUP = "0::/system.slice/workload.service\n"


class Vm:
    def __init__(self, ca: CA, workdir: Path, sockets: Path) -> None:
        self.ca = ca
        self.workdir = workdir
        self.sockets = sockets
        self.proc_root = workdir / "proc"
        self.proc_root.mkdir()
        self.agents: list[RunningNodeAgent] = []

    def place(self, pid: int, exe: str) -> None:
        directory = self.proc_root / str(pid)
        directory.mkdir(exist_ok=True)
        (directory / "cgroup").write_text(HOST_CGROUP)
        (directory / "exe").unlink(missing_ok=True)
        (directory / "exe").symlink_to(exe)
        (directory / "placed").write_text("")

    def join_token(self) -> Path:
        token = new_token()
        now = datetime.now(UTC)
        record = JoinToken(
            token_sha256=token_digest(token),
            spiffe_id=HOST,
            created_at=now,
            expires_at=now + timedelta(hours=1),
            created_by="test",
        )
        self.ca.running.store.add_join_tokens([record])
        path = self.workdir / "join-token"
        path.write_text(token + "\n")
        return path

    async def start_agent(self, *rules: str, **overrides: Any) -> RunningNodeAgent:
        root = self.workdir / "ca-root.pem"
        root.write_bytes(self.ca.root_pem)
        options: dict[str, Any] = {
            "ca_address": self.ca.address,
            "mtls_address": self.ca.mtls_address,
            "ca_trust_bundle": root,
            "ca_server_name": "localhost",
            "backoff_initial": "100ms",
            "backoff_max": "1s",
            "credential": "join-token",
            "token_file": self.join_token(),
            "attestation": "unix",
            "unix_workloads": list(rules)
            or [f"/vm/host-1/nginx path={NGINX}", f"/vm/host-1/postgres path={POSTGRES}"],
            "proc_root": self.proc_root,
            "workload_api_socket": self.sockets / "wl.sock",
            "sds_socket": self.sockets / "sds.sock",
            "socket_mode": 0o666,
        }
        options.update(overrides)
        agent = await start_node_agent(load_agent_settings(**options))
        self.agents.append(agent)
        await asyncio.wait_for(agent.wait_ready(), 20)
        return agent

    async def py_spiffe(self, exe: str) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PLACER),
            str(self.proc_root),
            "20",
            str(WLAPI_CLIENT),
            "fetch",
            str(self.sockets / "wl.sock"),
            "10",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        self.place(proc.pid, exe)
        out, err = await asyncio.wait_for(proc.communicate(), 40)
        lines = [line for line in out.decode().splitlines() if line.strip()]
        assert lines, err.decode()
        result: dict[str, Any] = json.loads(lines[-1])
        return result


@pytest.fixture
async def vm(start_ca: StartCA, tmp_path: Path) -> AsyncIterator[Vm]:
    ca = await start_ca(node_agents={"delegations": [{"agent": HOST, "spiffe_ids": [WEB, DB]}]})
    sockets = Path(tempfile.mkdtemp(prefix="vm-"))
    machine = Vm(ca, tmp_path, sockets)
    try:
        yield machine
    finally:
        for agent in machine.agents:
            await agent.stop()
        shutil.rmtree(sockets, ignore_errors=True)


async def test_each_process_gets_the_identity_its_rule_names(vm: Vm) -> None:
    agent = await vm.start_agent()
    web, db = await asyncio.gather(vm.py_spiffe(NGINX), vm.py_spiffe(POSTGRES))
    assert web.get("svid", {}).get("spiffe_id") == WEB, web
    assert db.get("svid", {}).get("spiffe_id") == DB, db
    # The agent asked with its own SVID (its join token was spent on it).
    assert agent.own is not None and agent.own.store.current() is not None
    rows = vm.ca.running.store.list_ledger(spiffe_id=WEB)
    assert [(r.agent_spiffe_id, r.node_name, r.auth_method) for r in rows] == [
        (HOST, None, "x509-svid")
    ]


async def test_a_process_matching_no_rule_is_refused_at_once(vm: Vm) -> None:
    await vm.start_agent()
    vm.place(os.getpid(), "/usr/bin/curl")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await fetch_in_process(vm.sockets / "wl.sock")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = info.value.details() or ""
    assert f"process {os.getpid()} (uid {os.getuid()}" in details
    assert "executable /usr/bin/curl matches no unix_workloads rule" in details


async def test_a_process_matching_two_identities_is_refused(vm: Vm) -> None:
    await vm.start_agent(f"/vm/host-1/nginx path={NGINX}", f"/vm/host-1/postgres uid={os.getuid()}")
    vm.place(os.getpid(), NGINX)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await fetch_in_process(vm.sockets / "wl.sock")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "a process must match exactly one identity" in (info.value.details() or "")


async def test_an_identity_the_ca_does_not_delegate_is_refused(vm: Vm) -> None:
    await vm.start_agent(f"/vm/host-1/redis path={NGINX}")
    vm.place(os.getpid(), NGINX)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await fetch_in_process(vm.sockets / "wl.sock")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not among the identities node_agents.delegations lists" in (info.value.details() or "")


def test_rules_are_checked_when_the_settings_are_read(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "ca_address": "ca:15012",
        "ca_plaintext": True,
        "attestation": "unix",
        "workload_api_socket": tmp_path / "wl.sock",
    }
    cases = {
        "spiffe://other.example/x path=/bin/x": "not a workload in trust domain cluster.local",
        "/x": "give at least one of uid, gid, path",
        "/x shell=/bin/sh": "'shell=/bin/sh' is not one of uid=, gid=, path=",
        "/x path=bin/x": "must be absolute",
        "/x uid=no-such-user-here": "uid 'no-such-user-here' is not a known name",
    }
    for rule, needle in cases.items():
        with pytest.raises(ConfigError, match=needle):
            load_agent_settings(**base, unix_workloads=[rule])
    with pytest.raises(ConfigError, match="needs at least one unix_workloads rule"):
        load_agent_settings(**base)
    settings = load_agent_settings(**base, unix_workloads="/a uid=0;/b gid=0 path=/bin/b")
    assert [(w.spiffe_id, w.uid, w.gid) for w in settings.unix_workloads] == [
        ("/a", 0, None),
        ("/b", None, 0),
    ]
    assert str(settings.workload_id(settings.unix_workloads[0])) == "spiffe://cluster.local/a"
