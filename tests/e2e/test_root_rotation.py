"""The root rotated under live traffic: prepare -> activate -> retire with no failed handshake.

A CA (or two replicas on one PostgreSQL database), two agents with the mTLS proxy in
process (frontend: outbound; web: inbound to an echo application), certificates living
seconds, and a client opening a new connection through both proxies every few
milliseconds while an operator runs the three commands. Agents take the bundle from the
CA's ``/v1/bundle``, pinned to the first root only: the pin must follow the rotation.
Run once with the root key in SoftHSM2 and once on PostgreSQL with two CA replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509

from meshca.agent.run import RunningAgent
from meshca.agent.trust import verify_chain
from meshca.cli.main import main
from meshca.pki.profile import fingerprint
from meshca.proxy.run import RunningProxy
from tests.agent.conftest import (  # noqa: F401 (fixtures)
    CA,
    StartCA,
    agents,
    kube,
    start,
    start_ca,
    write_token,
)
from tests.agent.conftest import settings_for as agent_settings
from tests.proxy.conftest import Echo, echo  # noqa: F401 (fixture)
from tests.proxy.support import config as proxy_config
from tests.proxy.support import plain_exchange, proxy, short_dir, wait_for_log

LISTEN = "127.0.0.1:0"
WEB = "spiffe://cluster.local/ns/default/sa/web"
FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"
LIFETIME = "4s"
PROPAGATION = "2s"
STEP_TIMEOUT = 30.0

pytestmark = pytest.mark.e2e


def _ca_options(**extra: Any) -> dict[str, Any]:
    return {
        "max_ttl": LIFETIME,
        "default_ttl": LIFETIME,
        "intermediate_ttl": "10s",
        "root_propagation": PROPAGATION,
        "maintenance_interval": "500ms",
        **extra,
    }


def _admin(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["admin", "root", *args], env=env)
    return result.exit_code, result.stdout, result.stderr


async def _until(check: Callable[[], bool], what: str, timeout: float = STEP_TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.05)


class Traffic:
    """New connections through the frontend's outbound proxy, one after another."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failed: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        n = 0
        while True:
            n += 1
            payload = f"hello {n}".encode()
            try:
                got = await plain_exchange(self.port, payload)
            except (OSError, TimeoutError) as exc:
                self.failed.append(f"#{n}: {exc!r}")
            else:
                if got == payload:
                    self.ok += 1
                else:
                    self.failed.append(f"#{n}: got {got!r}")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def _mesh(
    cas: list[CA],
    started: list[RunningAgent],
    echo_port: int,
    tmp_path: Path,
) -> AsyncIterator[tuple[RunningAgent, RunningProxy, RunningAgent]]:
    """web: an agent on the first CA serving the Workload API, and a ``meshca proxy``
    (inbound) taking its credentials from that socket; frontend: an agent on the last CA
    with its outbound proxy in process."""
    first_root = x509.load_pem_x509_certificate(cas[0].root_pem)
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({"listeners": {LISTEN: {"allow": [FRONTEND]}}}))

    async def agent(ca: CA, name: str, **options: Any) -> RunningAgent:
        workdir = tmp_path / name
        workdir.mkdir()
        settings = agent_settings(
            ca,
            workdir,
            token_file=write_token(workdir / "token", ca.kube, name),
            ca_trust_bundle=None,
            ca_bundle_url=ca.bundle_url,
            ca_bundle_sha256=[fingerprint(first_root)],
            bundle_refresh_interval="300ms",
            ttl=LIFETIME,
            mtls_address=ca.mtls_address,
            proxy_access_log=str(tmp_path / f"{name}.log"),
            **options,
        )
        running = await start(started, settings)
        await asyncio.wait_for(running.wait_ready(), STEP_TIMEOUT)
        if running.proxy is not None:
            await running.proxy.wait_ready()
        return running

    socket_dir = short_dir()
    try:
        web = await agent(cas[0], "web", workload_api_socket=socket_dir / "web.sock")
        web_cfg = proxy_config(
            tmp_path,
            inbound=(f"{LISTEN}=127.0.0.1:{echo_port}",),
            policy=policy,
            workload_api_socket=socket_dir / "web.sock",
            log_name="web.log",
        )
        async with proxy(web_cfg) as web_proxy:
            await asyncio.wait_for(web_proxy.wait_ready(), STEP_TIMEOUT)
            target = f"127.0.0.1:{web_proxy.ports[LISTEN]}"
            front = await agent(cas[-1], "frontend", outbound=[f"{LISTEN}={target},{WEB}"])
            yield web, web_proxy, front
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def _roots_in(agent: RunningAgent) -> set[str]:
    creds = agent.store.current()
    assert creds is not None
    return {fingerprint(c) for c in creds.bundle}


def _issuer_root(agent: RunningAgent, roots: dict[str, x509.Certificate]) -> str:
    creds = agent.store.current()
    assert creds is not None
    path = verify_chain(creds.chain[0], creds.chain[1:], list(roots.values()))
    return fingerprint(path[-1])


async def _rotate_under_traffic(
    cas: list[CA], started: list[RunningAgent], app: Echo, tmp_path: Path, env: dict[str, str]
) -> None:
    async with _mesh(cas, started, app.port, tmp_path) as (web, web_proxy, front):
        await _rotate(cas, web, web_proxy, front, tmp_path, env)


async def _rotate(
    cas: list[CA],
    web: RunningAgent,
    web_proxy: RunningProxy,
    front: RunningAgent,
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    state = ["--state-dir", str(cas[0].state_dir)]
    assert front.proxy is not None
    traffic = Traffic(front.proxy.ports[LISTEN])
    traffic.start()
    await _until(lambda: traffic.ok >= 5, "traffic flows before the rotation")
    old = fingerprint(x509.load_pem_x509_certificate(cas[0].root_pem))

    # prepare: every bundle (CA replicas, agents, proxies) holds both roots
    code, _, err = _admin(env, "prepare", *state)
    assert code == 0, err
    status = json.loads(_admin(env, "status", *state, "-o", "json")[1])
    new = next(r["fingerprint"] for r in status["roots"] if r["state"] == "prepared")
    for agent in (web, front):
        await _until(lambda a=agent: _roots_in(a) == {old, new}, "the two-root bundle")
    for ca in cas:
        bundle = {fingerprint(c) for c in ca.running.authority.trust_bundle()}
        assert bundle == {old, new}

    # activate: refused until root_propagation has passed, then every replica switches
    code, _, err = _admin(env, "activate", *state, new[:16])
    if code != 0:
        assert "needs until" in err and "--force" in err
        await asyncio.sleep(float(PROPAGATION.rstrip("s")))
        code, _, err = _admin(env, "activate", *state, new[:16])
    assert code == 0, err
    for ca in cas:
        await _until(
            lambda ca=ca: fingerprint(ca.running.authority.root_certificate) == new,
            "each CA replica signs under the new root",
        )
    roots = {
        old: x509.load_pem_x509_certificate(cas[0].root_pem),
        new: x509.load_pem_x509_certificate(root_pem(env, state, new).encode()),
    }
    for agent in (web, front):
        await _until(lambda a=agent: _issuer_root(a, roots) == new, "agents renewed")

    # retire: refused while certificates under the old root are unexpired
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2 * STEP_TIMEOUT
    refusals = 0
    while True:
        code, _, err = _admin(env, "retire", *state, old[:16])
        if code == 0:
            break
        assert "unexpired certificate(s) chain to root" in err, err
        refusals += 1
        assert loop.time() < deadline, err
        await asyncio.sleep(0.5)
    assert refusals > 0, "retire went through while certificates under the old root lived"
    for agent in (web, front):
        await _until(lambda a=agent: _roots_in(a) == {new}, "the old root left the bundle")
    for ca in cas:
        await _until(
            lambda ca=ca: {fingerprint(c) for c in ca.running.authority.trust_bundle()} == {new},
            "the old root left the CA's bundle",
        )
    ok_before = traffic.ok
    await _until(lambda: traffic.ok >= ok_before + 20, "traffic after the retirement")
    await traffic.stop()

    print(f"rotation: {traffic.ok} connections, {len(traffic.failed)} failed, {refusals} refusals")
    assert traffic.failed == [], f"{len(traffic.failed)} failed: {traffic.failed[:5]}"
    new_only = [roots[new]]
    for agent in (web, front):
        creds = agent.store.current()
        assert creds is not None
        assert fingerprint(verify_chain(creds.chain[0], creds.chain[1:], new_only)[-1]) == new
    assert front.proxy is not None
    for running in (web_proxy, front.proxy):
        assert running.state.contexts is not None
        in_use = running.state.contexts.creds
        verify_chain(in_use.chain[0], in_use.chain[1:], new_only)
        assert {fingerprint(c) for c in in_use.bundle} == {new}
    for ca in cas:
        server_cert = ca.running.server_cert
        assert server_cert is not None
        chain = [x509.load_pem_x509_certificate(p.encode()) for p in server_cert.chain_pem]
        verify_chain(chain[0], chain[1:-1], new_only)
    # every connection made is logged once it closes (the last ones may still be closing)
    inbound = await wait_for_log(tmp_path / "web.log", lambda ls: len(ls) >= traffic.ok, "all")
    outbound = await wait_for_log(
        tmp_path / "frontend.log", lambda ls: len(ls) >= traffic.ok, "all"
    )
    assert all(line["peer_spiffe_id"] == FRONTEND for line in inbound)
    assert all(line["peer_spiffe_id"] == WEB for line in outbound)


def root_pem(env: dict[str, str], state: list[str], fp: str) -> str:
    """A root's certificate PEM as the store holds it."""
    from meshca.config import load_settings
    from meshca.store import Store

    settings = load_settings(state_dir=Path(state[1]), database_url=env.get("MESHCA_DATABASE_URL"))
    store = Store.open_read_only(settings.effective_database_url)
    try:
        (root,) = [r for r in store.list_roots() if r.fingerprint == fp]
        return root.certificate_pem
    finally:
        store.close()


async def test_rotation_with_the_root_in_softhsm(
    start_ca: StartCA,  # noqa: F811
    agents: list[RunningAgent],  # noqa: F811
    echo: Echo,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.fakes.softhsm import MAIN_TOKEN, PIN_ENV, softhsm, unique_label

    hsm = softhsm(tmp_path)
    label = unique_label("rotate")
    signer = {
        "kind": "pkcs11",
        "module": str(hsm.module),
        "token_label": MAIN_TOKEN,
        "key_label": label,
        "pin_env": PIN_ENV,
    }
    env = {
        PIN_ENV: os.environ[PIN_ENV],
        "MESHCA_SIGNER__KIND": "pkcs11",
        "MESHCA_SIGNER__MODULE": str(hsm.module),
        "MESHCA_SIGNER__TOKEN_LABEL": MAIN_TOKEN,
        "MESHCA_SIGNER__KEY_LABEL": label,
        "MESHCA_SIGNER__PIN_ENV": PIN_ENV,
        "MESHCA_ROOT_PROPAGATION": PROPAGATION,
    }
    state = tmp_path / "ca-state-0"  # where start_ca puts its first CA
    code, _, err = _admin(env, "create", "--state-dir", str(state))
    assert code == 0, err
    ca = await start_ca(**_ca_options(signer=signer))
    assert ca.running.authority.root_signer.backend == "pkcs11"
    await _rotate_under_traffic([ca], agents, echo, tmp_path, env)
    assert ca.running.authority.root_signer.backend == "pkcs11"
    assert ca.running.authority.root.key_ref.startswith(f"pkcs11:token={MAIN_TOKEN}")
    assert f"object={label}-" in ca.running.authority.root.key_ref  # the new key


@pytest.mark.postgres
async def test_rotation_with_two_ca_replicas_on_postgresql(
    postgres_url: str,  # first: the database outlives the CAs (fixtures end in reverse)
    start_ca: StartCA,  # noqa: F811
    agents: list[RunningAgent],  # noqa: F811
    echo: Echo,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two replicas sharing only the database (and, here, the key files' directory);
    each switches to the new root on its own."""
    first = await start_ca(**_ca_options(database_url=postgres_url))
    second = await start_ca(**_ca_options(database_url=postgres_url))
    assert first.root_pem == second.root_pem
    env = {"MESHCA_DATABASE_URL": postgres_url, "MESHCA_ROOT_PROPAGATION": PROPAGATION}
    await _rotate_under_traffic([first, second], agents, echo, tmp_path, env)
