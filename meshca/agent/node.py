"""Composition of a node agent (``attestation`` ``k8s`` or ``unix``): one agent serving
every workload of its node, each with its own identity.

Start-up: the credential is checked (as for any agent); the workload attestor is built
(the kubelet client and the proc root, or the unix rules); the SDS and Workload API
sockets start behind their caller-identifying relays; the health and metrics server
starts; then the maintenance task runs. An agent whose credential cannot be presented
again (``join-token``, ``svid``) also keeps an SVID of its own, to ask with.

Maintenance, every few seconds: the kubelet's pod list is fetched again (a failure is
logged once per reason; the list held meanwhile still answers); identities nobody uses
any more are dropped (:class:`~meshca.agent.identities.IdentityPool`); the trust bundle
is re-read every ``bundle_refresh_interval`` and a change is published to every identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from meshca.agent._caller_socket import CallerRegistry
from meshca.agent.attestation import (
    KubernetesAttestor,
    UnixAttestor,
    UnixRule,
    WorkloadAttestor,
)
from meshca.agent.client import CAClient
from meshca.agent.config import AgentSettings
from meshca.agent.credentials import CredentialSink, CredentialStore, stop_sinks
from meshca.agent.http import Answer, HealthServer
from meshca.agent.identities import CallerStores, IdentityPool
from meshca.agent.kubelet import KubeletPods
from meshca.agent.metrics import AgentMetrics, listen_http
from meshca.agent.rotation import SVID_ONLY_RENEWAL, Backoff, RenewalSchedule, RotationEngine
from meshca.agent.trust import TrustAnchors, TrustError
from meshca.errors import ConfigError
from meshca.kube.podinfo import PodLookupError
from meshca.spiffe import SpiffeId

log = logging.getLogger(__name__)

MAINTENANCE_SECONDS = 5.0


@dataclass
class RunningNodeAgent:
    """A started node agent; ``stop()`` shuts everything down."""

    settings: AgentSettings
    anchors: TrustAnchors
    pool: IdentityPool
    callers: CallerStores
    metrics: AgentMetrics
    sinks: list[tuple[str, CredentialSink]]
    kubelet: KubeletPods | None
    own: RotationEngine | None
    http_server: HealthServer | None = None
    http_port: int | None = None
    task: asyncio.Task[None] = field(init=False)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _problem: str | None = None

    async def wait_ready(self) -> None:
        """Once the sockets serve and, in Kubernetes, the kubelet has answered."""
        await self._ready.wait()

    def readiness(self) -> Answer:
        if self.kubelet is not None and not self.kubelet.answered:
            why = self._problem or "the kubelet has not answered yet"
            return Answer(503, f"not ready\n{why}\n".encode())
        if self.own is not None and self.own.store.current() is None:
            return Answer(503, b"not ready\nno certificate of the agent's own yet\n")
        return Answer(200, f"ready\nserving {len(self.pool)} identities\n".encode())

    def status_line(self) -> str:
        s = self.settings
        how = (
            f"pods of this node (kubelet {s.kubelet_url})"
            if s.attestation == "k8s"
            else f"{len(s.unix_workloads)} unix workload rule(s)"
        )
        http = "off"
        if s.http_listen is not None and self.http_port is not None:
            http = f"{s.http_listen.rpartition(':')[0]}:{self.http_port}"
        return (
            f"meshca node agent ready: attestation {s.attestation}, serving {how}; "
            f"CA {s.ca_address}; trust {self.anchors.description}; credential "
            f"{s.credential}; delivery {', '.join(name for name, _ in self.sinks)}; "
            f"HTTP on {http}"
        )

    def renew_now(self) -> None:
        """SIGHUP: every identity (and the agent's own SVID) renews at once."""
        if self.own is not None:
            self.own.renew_now()
        for spiffe_id in list(self.pool.identities()):
            engine = self.pool.engine(spiffe_id)
            if engine is not None:
                engine.renew_now()

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await stop_sinks(self.sinks)
        await self.pool.close()
        if self.http_server is not None:
            await self.http_server.stop()
        if self.kubelet is not None:
            await self.kubelet.close()
        if self.own is not None:
            await self.own.client.close()

    async def run(self) -> None:
        """The maintenance loop (and the agent's own engine); cancel to stop."""
        async with asyncio.TaskGroup() as tasks:
            if self.own is not None:
                tasks.create_task(self.own.run())
            tasks.create_task(self._maintain())

    async def _maintain(self) -> None:
        bundle_due = time.monotonic() + self.settings.bundle_refresh_interval.total_seconds()
        while True:
            await self._refresh_pods()
            if self.kubelet is None or self.kubelet.answered:
                self._ready.set()
            self.pool.sweep()
            self.metrics.workload_identities.set(len(self.pool))
            if time.monotonic() >= bundle_due:
                bundle_due += self.settings.bundle_refresh_interval.total_seconds()
                await self._refresh_bundle()
            await asyncio.sleep(MAINTENANCE_SECONDS)

    async def _refresh_pods(self) -> None:
        if self.kubelet is None:
            return
        try:
            await self.kubelet.refresh()
        except PodLookupError as exc:
            if exc.message != self._problem:
                log.warning("%s; retrying", exc.message)
            self._problem = exc.message
            return
        if self._problem is not None:
            log.info("the kubelet answers again")
        self._problem = None

    async def _refresh_bundle(self) -> None:
        try:
            changed = await self.anchors.refresh()
        except TrustError as exc:
            self.metrics.bundle_failures.labels(exc.reason).inc()
            log.warning("trust bundle refresh failed, keeping the roots in force: %s", exc)
            return
        if changed:
            self.metrics.bundle_roots.set(len(self.anchors.current))
            for store in self.pool.stores():
                await store.publish_bundle(self.anchors.current)


def _attestor(settings: AgentSettings) -> tuple[WorkloadAttestor, KubeletPods | None]:
    if settings.attestation == "k8s":
        assert settings.kubelet_url is not None
        kubelet = KubeletPods(
            settings.kubelet_url,
            ca_file=settings.kubelet_ca_file,
            token_file=settings.kubelet_token_file,
            timeout=settings.request_timeout,
        )
        attestor = KubernetesAttestor(
            settings.trust_domain_value,
            kubelet,
            proc_root=settings.proc_root,
            wait=settings.attestation_timeout,
        )
        return attestor, kubelet
    rules = [
        UnixRule(
            settings.workload_id(rule),
            uid=rule.uid,
            gid=rule.gid,
            path=str(rule.path) if rule.path is not None else None,
        )
        for rule in settings.unix_workloads
    ]
    return UnixAttestor(rules, proc_root=settings.proc_root), None


async def start_node_agent(settings: AgentSettings) -> RunningNodeAgent:
    """Start a node agent; raise ConfigError/MeshcaError naming what failed."""
    from meshca.agent.run import (
        build_client,
        build_sinks,
        bundle_source,
        check_credential,
        own_bootstrap,
    )

    if not settings.proc_root.is_dir():
        raise ConfigError(f"proc_root {settings.proc_root} is not a directory")
    own_client = build_client(settings)
    await check_credential(settings, own_client)
    anchors = own_client.anchors
    metrics = AgentMetrics()
    schedule = RenewalSchedule(settings.renew_ratio, settings.renew_jitter)
    backoff = Backoff(settings.backoff_initial, settings.backoff_max)
    own: RotationEngine | None = None
    if settings.credential in SVID_ONLY_RENEWAL:
        own = RotationEngine(
            client=own_client,
            store=CredentialStore(),
            key_type=settings.key_type,
            ttl=settings.ttl,
            schedule=schedule,
            backoff=backoff,
            metrics=metrics,
            credential=settings.credential,
            bootstrap=own_bootstrap(settings),
            track_expiry=False,
        )
    credential = own_client.credential

    def make_engine(spiffe_id: SpiffeId, store: CredentialStore) -> RotationEngine:
        client = CAClient(
            address=settings.ca_address,
            anchors=anchors,
            credential=credential,
            server_name=settings.server_name,
            timeout=settings.request_timeout,
            mtls_address=settings.mtls_address,
            cluster_id=settings.cluster_id,
        )
        return RotationEngine(
            client=client,
            store=store,
            key_type=settings.key_type,
            ttl=settings.ttl,
            schedule=schedule,
            backoff=backoff,
            metrics=metrics,
            credential=settings.credential,
            impersonate=spiffe_id,
            agent_svid=own.store.current if own is not None else None,
            track_expiry=False,
        )

    attestor, kubelet = _attestor(settings)
    pool = IdentityPool(
        make_engine, idle_grace=settings.identity_idle_grace, in_use=attestor.identities_in_use
    )
    metrics.track_soonest(pool.stores)
    callers = CallerStores(
        CallerRegistry(),
        attestor,
        pool,
        retry_after=settings.backoff_initial,
        refused=lambda reason: metrics.callers_refused.labels(reason).inc(),
    )
    if bundle_source(settings) is not None:
        await anchors.refresh()
    node = RunningNodeAgent(
        settings=settings,
        anchors=anchors,
        pool=pool,
        callers=callers,
        metrics=metrics,
        sinks=build_sinks(settings, callers),
        kubelet=kubelet,
        own=own,
    )
    started: list[tuple[str, CredentialSink]] = []
    try:
        for name, sink in node.sinks:
            await sink.start(CredentialStore())  # each caller is served its own store
            started.append((name, sink))
        if settings.http_listen is not None:
            node.http_server, node.http_port = await listen_http(
                settings.http_listen, CredentialStore(), metrics, node.readiness
            )
    except BaseException:
        for _, sink in reversed(started):
            await sink.stop()
        if kubelet is not None:
            await kubelet.close()
        await own_client.close()
        raise
    node.task = asyncio.create_task(node.run(), name="meshca-node-agent")
    return node
