"""Composition root of ``meshca server``: wires store, signer, authority, authn and APIs.

Start-up order: open the database and apply migrations; open the signer (creating the
file root key on first start); load or create the active root; mint this process's
issuing intermediate; start the gRPC listeners (TLS for token callers, mTLS for SVID
renewal, or one plaintext port for development) and the HTTP listener. A background task
rotates the intermediate, renews the server certificate and reloads the trust bundle.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshca.api.admission import Admission, AdmissionLimits
from meshca.api.grpc import CertificateFrontend, add_services, server_options
from meshca.api.http import CachedCheck, ReadinessCheck, build_app
from meshca.api.http_guard import (
    ConnectionGuard,
    GuardedSite,
    HttpLimits,
    raise_file_limit,
    runner_options,
)
from meshca.api.tls import ServerCertificate
from meshca.authn.base import Attestation, Authenticator, Credential, Peer
from meshca.authn.gce import GceAuthenticator, TokenLedger
from meshca.authn.issuers import Issuer, IssuerWatch
from meshca.authn.join_token import JoinTokenAuthenticator
from meshca.authn.k8s import KubernetesAuthenticator
from meshca.authn.svid import CallerAuthenticator, SvidAuthenticator
from meshca.ca.authority import Authority, IntermediateSettings, utcnow
from meshca.ca.issuing_keys import HsmKeys, MemoryKeys
from meshca.ca.node_authz import NodeAuthorizer
from meshca.ca.policy import IssuancePolicy
from meshca.ca.roots import load_active_root, open_root_signer
from meshca.ca.roots import signer_config_for as open_root_config
from meshca.config import Pkcs11SignerConfig, Settings
from meshca.durations import format_duration
from meshca.errors import (
    AuthenticationError,
    ConfigError,
    MeshcaError,
    SignerError,
    StoreError,
)
from meshca.metrics import CAMetrics
from meshca.pki.bundle import bundle_pem
from meshca.pki.profile import fingerprint
from meshca.ports import listening_pids, split_host_port
from meshca.signers.base import Signer, close_signer
from meshca.signers.factory import open_signer
from meshca.spiffe import SpiffeId
from meshca.store import RootRecord, Store

if TYPE_CHECKING:
    from meshca.kube.bundle_configmaps import BundleWriter

log = logging.getLogger(__name__)

SIGNER_PROBE_INTERVAL = timedelta(seconds=30)
READINESS_RECHECK_SECONDS = 1.0
"""How long a ledger check's outcome (or a failed signer probe's) answers /readyz."""
SERVICE_NAMES = (
    "istio.v1.auth.IstioCertificateService",
    "google.security.meshca.v1.MeshCertificateService",
)
CA_SPIFFE_PATH = "/meshca"
SERVER_CERT_LIFETIME = timedelta(hours=24)
"""The CA's own TLS certificate: renewed at half life, never past its intermediate."""


class NoAuthenticator:
    """Used when no cluster is configured: every token is refused, saying why."""

    async def authenticate(self, credential: Credential, peer: Peer) -> Attestation:
        raise AuthenticationError(
            "this CA has no Kubernetes cluster configured; start it with --k8s-oidc-issuer, "
            "--k8s-jwks-url or --k8s-api-server, or list clusters in the config file (a "
            "machine outside Kubernetes joins with a token from `meshca admin join-token "
            "create`)",
            reason="no_authenticator",
        )


def _grpc_address(listen: str, what: str) -> str:
    host, port = split_host_port(listen, what)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class RunningServer:
    """A started CA; ``stop()`` shuts everything down."""

    settings: Settings
    store: Store
    signer: Signer
    authority: Authority
    authenticator: CallerAuthenticator
    grpc_server: aio.Server
    http_runner: web.AppRunner
    grpc_port: int
    mtls_port: int | None
    http_port: int
    server_cert: ServerCertificate | None
    metrics: CAMetrics
    issuer_watch: IssuerWatch = field(default_factory=lambda: IssuerWatch(()))
    bundle_writer: BundleWriter | None = None
    node_authorizer: NodeAuthorizer | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def status_line(self) -> str:
        s = self.settings
        grpc_host, _ = split_host_port(s.grpc_listen, "grpc_listen")
        http_host, _ = split_host_port(s.http_listen, "http_listen")
        mtls = ""
        if self.mtls_port is not None and s.grpc_mtls_listen:
            mtls_host, _ = split_host_port(s.grpc_mtls_listen, "grpc_mtls_listen")
            mtls = f"gRPC mTLS (SVID renewal) on {mtls_host}:{self.mtls_port}; "
        issuing = self.authority.current_issuing_ca
        return (
            f"meshca ready: trust domain {s.trust_domain}; "
            f"gRPC {'plaintext' if s.plaintext else 'TLS'} on {grpc_host}:{self.grpc_port}; "
            f"{mtls}HTTP on {http_host}:{self.http_port}; "
            f"root {fingerprint(self.authority.root_certificate)[:16]} "
            f"({self.authority.root_signer.backend}: {self.authority.root_signer.key_id}); "
            f"intermediate valid until {issuing.not_after.isoformat() if issuing else '-'}; "
            f"database {self.store.redacted_url()}"
        )

    async def maintain_once(self) -> None:
        """Rotate the intermediate, reload the bundle (following a root activated by an
        operator: new intermediate, new server certificate), renew the server certificate."""
        await self._heartbeat()
        await self.authority.rotate_if_due()
        try:
            switched = await self.authority.refresh_trust_bundle()
        except SignerError as exc:
            # The rest of maintenance (the server certificate above all) must go on.
            switched = False
            log.error(
                "the store's active root cannot sign here (%s); still signing with root %s",
                exc,
                fingerprint(self.authority.root_certificate)[:16],
            )
        if self.server_cert is not None:
            await self.server_cert.refresh(SERVER_CERT_LIFETIME, renew=switched)
        self.metrics.update_expiry()
        self._warn_if_root_expires_soon()

    def _warn_if_root_expires_soon(self) -> None:
        not_after = self.authority.root_certificate.not_valid_after_utc
        left = not_after - utcnow()
        near = left <= self.settings.root_expiry_warning
        self.metrics.root_expiry_warning.set(1 if near else 0)
        if near:
            log.warning(
                "the active root %s expires at %s (in %s); rotate it now: "
                "`meshca admin root prepare`, then `activate` and `retire`",
                fingerprint(self.authority.root_certificate)[:16],
                not_after.isoformat(),
                format_duration(max(left, timedelta(0))),
            )

    async def _heartbeat(self) -> None:
        """Record that this process still signs with its intermediate (``admin status``
        tells one in use from one left behind by a crashed process by this)."""
        current = self.authority.current_issuing_ca
        if current is None:
            return
        try:
            await asyncio.to_thread(
                self.store.heartbeat_intermediate,
                self.authority.owner,
                current.fingerprint,
                utcnow(),
            )
        except StoreError as exc:
            log.warning("could not record the intermediate as in use: %s", exc)

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.settings.maintenance_interval.total_seconds())
            try:
                await self.maintain_once()
            except MeshcaError as exc:
                log.warning("maintenance failed, will retry: %s", exc)
            except Exception:  # a boundary: the loop must outlive any one failure
                log.exception("maintenance failed unexpectedly, will retry")

    async def stop(self, grace: float = 5.0) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.issuer_watch.stop()
        if self.bundle_writer is not None:
            await self.bundle_writer.stop()
        await self.grpc_server.stop(grace)
        await self.http_runner.cleanup()
        await self.authenticator.close()
        if self.node_authorizer is not None:
            await self.node_authorizer.close()
        await self.authority.close()
        try:
            await asyncio.to_thread(self.store.retire_intermediates, self.authority.owner, utcnow())
        except StoreError as exc:
            log.warning("could not record this process's intermediates as retired: %s", exc)
        await asyncio.to_thread(close_signer, self.signer)
        await asyncio.to_thread(self.store.close)


def build_token_authenticator(settings: Settings) -> Authenticator:
    clusters = settings.effective_clusters
    if not clusters:
        log.warning(
            "no Kubernetes cluster configured: every Kubernetes token will be refused (join "
            "tokens and SVID renewals still work)"
        )
        return NoAuthenticator()
    return KubernetesAuthenticator(
        settings.trust_domain_value, clusters, default_cluster=settings.default_cluster
    )


def build_gce_authenticator(settings: Settings, ledger: TokenLedger) -> GceAuthenticator | None:
    """GCE instance identity validation, when ``gce_projects`` turns it on."""
    gce = settings.gce
    if gce is None:
        return None
    log.info(
        "accepting GCE instance identity tokens (audience %s) from project(s) %s",
        gce.audience,
        ", ".join(gce.projects),
    )
    return GceAuthenticator(settings.trust_domain_value, gce, ledger)


def build_node_authorizer(settings: Settings) -> NodeAuthorizer | None:
    """Node authorization, when ``node_agents`` lists agents that may act for others."""
    config = settings.node_agents
    if not config.enabled:
        return None
    pods = None
    cluster = settings.node_agents_cluster
    if config.service_accounts:
        # Imported only when node agents are set: the Kubernetes client is large.
        from meshca.kube.client import api_client
        from meshca.kube.pods import PodDirectory

        pods = PodDirectory(
            api_client(config, "node_agents"),
            ttl=config.pod_cache_ttl,
            min_refresh=config.min_refresh_interval,
            timeout=config.timeout,
        )
        log.info(
            "node agents %s (cluster %s) may obtain the identities of pods on their node",
            ", ".join(config.service_accounts),
            cluster,
        )
    if config.delegations:
        log.info(
            "agents %s may obtain the identities node_agents.delegations lists",
            ", ".join(d.agent for d in config.delegations),
        )
    return NodeAuthorizer(settings.trust_domain_value, config, cluster_id=cluster, pods=pods)


def _load_root(settings: Settings, store: Store, signer: Signer) -> RootRecord:
    """The active root; the file backend creates it on first start, others never do."""
    root, _ = load_active_root(
        store,
        signer,
        settings.trust_domain_value,
        now=utcnow(),
        create_ttl=settings.root_ttl if signer.backend == "file" else None,
    )
    return root


def _open_signer(settings: Settings, store: Store) -> Signer:
    """The active root's key (after a rotation, the one its record names, reached through
    the configured signer section); the configured key when no root is recorded yet."""
    active = store.active_root()
    if active is not None and active.backend == settings.signer.kind:
        configured = open_root_config(active, settings.signer)
        if configured != settings.signer:
            return open_root_signer(active, settings.signer, settings.state_dir)
    signer, created = open_signer(settings.signer, state_dir=settings.state_dir, create=True)
    if created:
        log.info("created root key %s (%s)", signer.key_id, signer.algorithm)
    return signer


async def _open_authority(settings: Settings, store: Store, signer: Signer) -> Authority:
    trust_domain = settings.trust_domain_value
    root = await asyncio.to_thread(_load_root, settings, store, signer)
    authority = Authority(
        trust_domain=trust_domain,
        root_signer=signer,
        root=root,
        store=store,
        policy=IssuancePolicy(trust_domain, settings.max_ttl, settings.default_ttl),
        intermediate=IntermediateSettings(
            keys=HsmKeys(settings.signer)
            if settings.issuing_key == "hsm" and isinstance(settings.signer, Pkcs11SignerConfig)
            else MemoryKeys(),
            ttl=settings.intermediate_ttl,
            rotate_fraction=settings.intermediate_rotate_fraction,
            name_constraints=settings.intermediate_name_constraints,
        ),
        root_signers=functools.partial(
            open_root_signer, configured=settings.signer, state_dir=settings.state_dir
        ),
    )
    await authority.refresh_trust_bundle()
    await authority.issuing_ca()
    return authority


def prepare_state(settings: Settings) -> None:
    """What several worker processes must not race on: migrations and the root."""
    store = Store.open(settings.effective_database_url)
    try:
        signer = _open_signer(settings, store)
        try:
            _load_root(settings, store, signer)
        finally:
            close_signer(signer)
    finally:
        store.close()


def _bind(server: aio.Server, listen: str, what: str, add: Callable[[str], int]) -> int:
    try:
        bound = add(_grpc_address(listen, what))
    except RuntimeError as exc:
        _, port = split_host_port(listen, what)
        holders = sorted(listening_pids(port))
        reason = f"port {port} is in use by another process (pid {holders[0]})" if holders else exc
        raise ConfigError(f"cannot listen for gRPC on {listen}: {reason}") from exc
    if not bound:
        raise ConfigError(f"cannot listen for gRPC on {listen}")
    return bound


async def start_server(
    settings: Settings, *, reuse_port: bool = False, migrate: bool = True
) -> RunningServer:
    """Start every part of the CA; raise ConfigError/MeshcaError naming what failed.

    ``reuse_port`` and ``migrate=False`` are for worker processes: they share their
    listening ports, and the supervisor has already applied the migrations. If any part
    fails to start, the parts already started are stopped again.
    """
    async with contextlib.AsyncExitStack() as undo:
        running = await _start(settings, reuse_port, migrate, undo)
        undo.pop_all()
        return running


async def _start(
    settings: Settings, reuse_port: bool, migrate: bool, undo: contextlib.AsyncExitStack
) -> RunningServer:
    http_host, http_port = split_host_port(settings.http_listen, "http_listen")
    open_store = Store.open if migrate else Store
    store = await asyncio.to_thread(open_store, settings.effective_database_url)
    undo.push_async_callback(asyncio.to_thread, store.close)
    signer = await asyncio.to_thread(_open_signer, settings, store)
    undo.push_async_callback(asyncio.to_thread, close_signer, signer)
    authority = await _open_authority(settings, store, signer)
    undo.push_async_callback(authority.close)

    metrics = CAMetrics()
    metrics.track_expiry(
        lambda: authority.root_certificate.not_valid_after_utc,
        lambda: ca.not_after if (ca := authority.current_issuing_ca) else None,
    )

    async def issued_before(leaf: x509.Certificate) -> bool:
        pem = leaf.public_bytes(serialization.Encoding.PEM).decode()
        row = await asyncio.to_thread(store.issued_certificate, f"{leaf.serial_number:x}", pem)
        return row is not None

    token_authenticator = build_token_authenticator(settings)
    gce_authenticator = build_gce_authenticator(settings, store)
    authenticator = CallerAuthenticator(
        token_authenticator,
        SvidAuthenticator(authority.trust_domain, authority.trust_bundle, issued_before),
        gce=gce_authenticator,
        join=JoinTokenAuthenticator(authority.trust_domain, store),
    )
    undo.push_async_callback(authenticator.close)
    node_authorizer = build_node_authorizer(settings)
    if node_authorizer is not None:
        undo.push_async_callback(node_authorizer.close)
    issuers: list[Issuer] = []
    for part in (token_authenticator, gce_authenticator):
        if isinstance(part, KubernetesAuthenticator | GceAuthenticator):
            issuers.extend(part.issuers)
    issuer_watch = IssuerWatch(issuers)
    issuer_watch.start()
    undo.push_async_callback(issuer_watch.stop)
    grpc_server = aio.server(
        options=server_options(
            handshake_timeout=settings.grpc_handshake_timeout,
            reuse_port=reuse_port,
            max_connection_age=settings.grpc_max_connection_age,
        )
    )
    admission = Admission(
        AdmissionLimits(
            max_in_flight=settings.max_in_flight,
            per_peer=settings.rate_limit_per_peer,
            per_identity=settings.rate_limit_per_identity,
        )
    )
    frontend = CertificateFrontend(
        authority, authenticator, metrics, admission, node_authorizer=node_authorizer
    )
    add_services(grpc_server, frontend)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)

    server_cert: ServerCertificate | None = None
    mtls_port: int | None = None
    if settings.plaintext:
        grpc_port = _bind(
            grpc_server, settings.grpc_listen, "grpc_listen", grpc_server.add_insecure_port
        )
    else:
        server_cert = ServerCertificate(
            authority, SpiffeId(authority.trust_domain, CA_SPIFFE_PATH), settings.server_dns_names
        )
        await server_cert.refresh(SERVER_CERT_LIFETIME)
        tls = server_cert.credentials(require_client_certificate=False)
        grpc_port = _bind(
            grpc_server,
            settings.grpc_listen,
            "grpc_listen",
            lambda a: grpc_server.add_secure_port(a, tls),
        )
        if settings.grpc_mtls_listen:
            mtls = server_cert.credentials(require_client_certificate=True)
            mtls_port = _bind(
                grpc_server,
                settings.grpc_mtls_listen,
                "grpc_mtls_listen",
                lambda a: grpc_server.add_secure_port(a, mtls),
            )
    await grpc_server.start()
    undo.push_async_callback(grpc_server.stop, 0)
    for service in (*SERVICE_NAMES, ""):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def check_signer() -> None:
        await asyncio.to_thread(signer.sign, b"meshca readiness probe")

    async def check_database() -> None:
        problems = await asyncio.to_thread(store.ledger_problems)
        if problems:
            raise StoreError("; ".join(problems), reason="ledger_not_writable")

    # /readyz is unauthenticated: a probe signature is a billed round trip on KMS and the
    # ledger check takes the head's write lock, so each runs at most once per period
    # however often (and however many at once) the probes come.
    checks: dict[str, ReadinessCheck] = {
        "signer": CachedCheck(
            check_signer,
            ok_for=SIGNER_PROBE_INTERVAL.total_seconds(),
            failed_for=READINESS_RECHECK_SECONDS,
        ),
        "database": CachedCheck(
            check_database, ok_for=READINESS_RECHECK_SECONDS, failed_for=READINESS_RECHECK_SECONDS
        ),
        "issuers": issuer_watch.check,
    }
    guard = ConnectionGuard(
        HttpLimits.resolve(
            settings.http_max_connections, settings.http_idle_timeout, raise_file_limit()
        ),
        metrics,
    )
    app = build_app(authority, metrics, checks, middlewares=[guard.middleware])
    runner = web.AppRunner(app, **runner_options(guard))
    await runner.setup()
    undo.push_async_callback(runner.cleanup)
    try:
        await GuardedSite(runner, http_host, http_port, guard, reuse_port=reuse_port).start()
    except OSError as exc:
        raise ConfigError(f"cannot listen for HTTP on {settings.http_listen}: {exc}") from exc

    running = RunningServer(
        settings=settings,
        store=store,
        signer=signer,
        authority=authority,
        authenticator=authenticator,
        grpc_server=grpc_server,
        http_runner=runner,
        grpc_port=grpc_port,
        mtls_port=mtls_port,
        http_port=runner.addresses[0][1],
        server_cert=server_cert,
        metrics=metrics,
        issuer_watch=issuer_watch,
        bundle_writer=_start_bundle_writer(settings, authority, undo),
        node_authorizer=node_authorizer,
    )
    running._tasks.append(asyncio.create_task(running._maintain()))
    return running


def _start_bundle_writer(
    settings: Settings, authority: Authority, undo: contextlib.AsyncExitStack
) -> BundleWriter | None:
    """The trust bundle ConfigMap writer, when ``bundle_configmap.enabled``."""
    if not settings.bundle_configmap.enabled:
        return None
    # Imported only when enabled: the Kubernetes client is large.
    from meshca.kube.bundle_configmaps import BundleWriter

    writer = BundleWriter(
        settings.bundle_configmap,
        authority.owner,
        lambda: bundle_pem(authority.trust_bundle()),
    )
    writer.start()
    undo.push_async_callback(writer.stop)
    return writer


async def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, then stop gracefully."""
    running = await start_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Once, on standard output (where scripts look; the log would show it again), and only
    # once a signal stops the server cleanly: whoever reads the line may send one at once.
    print(running.status_line(), flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await running.stop()
