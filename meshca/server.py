"""Composition root of ``meshca server``: wires store, signer, authority, authn and APIs.

Start-up order: open the database and apply migrations; open the signer (creating the
file root key on first start); load or create the active root; mint this process's
issuing intermediate; start the gRPC (TLS unless --plaintext) and HTTP listeners. A
background task rotates the intermediate, renews the server certificate and reloads the
trust bundle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import grpc
from aiohttp import web
from cryptography import x509
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshca.api.grpc import SERVER_OPTIONS, CertificateFrontend, add_services
from meshca.api.http import build_app
from meshca.authn.base import Attestation, Authenticator, Credential, Peer
from meshca.authn.k8s import KubernetesAuthenticator
from meshca.ca.authority import Authority, IntermediateSettings, utcnow
from meshca.ca.policy import IssuancePolicy
from meshca.ca.roots import load_active_root
from meshca.config import Settings
from meshca.errors import AuthenticationError, ConfigError, MeshcaError
from meshca.metrics import CAMetrics
from meshca.pki.profile import fingerprint
from meshca.signers.base import Signer
from meshca.signers.factory import open_signer
from meshca.spiffe import SpiffeId
from meshca.store import Store

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL = timedelta(seconds=30)
SERVICE_NAMES = (
    "istio.v1.auth.IstioCertificateService",
    "google.security.meshca.v1.MeshCertificateService",
)


class NoAuthenticator:
    """Used when no cluster is configured: every request is refused, saying why."""

    async def authenticate(self, credential: Credential, peer: Peer) -> Attestation:
        raise AuthenticationError(
            "this CA has no Kubernetes cluster configured; start it with --k8s-oidc-issuer, "
            "--k8s-jwks-url or --k8s-api-server, or list clusters in the config file",
            reason="no_authenticator",
        )


def split_host_port(listen: str, what: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{what} {listen!r} must be HOST:PORT, e.g. 127.0.0.1:15012")
    return host.strip("[]"), int(port)


class ServerCertificate:
    """The CA's own TLS certificate for its gRPC port, renewed at half life."""

    def __init__(self, authority: Authority, spiffe_id: SpiffeId, dns_names: list[str]) -> None:
        self._authority = authority
        self._spiffe_id = spiffe_id
        self._dns_names = dns_names
        self._config: grpc.ServerCertificateConfiguration | None = None
        self._fresh = False
        self.chain_pem: tuple[str, ...] = ()
        self._renew_at = utcnow()

    async def renew_if_due(self, lifetime: timedelta) -> None:
        """Issue a new server certificate when none exists or half its life has passed."""
        if self._config is not None and utcnow() < self._renew_at:
            return
        key_pem, chain = await self._authority.issue_server_certificate(
            self._spiffe_id, self._dns_names, lifetime
        )
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        self.chain_pem = chain
        self._config = grpc.ssl_server_certificate_configuration(
            [(key_pem, "".join(chain[:-1]).encode())]
        )
        self._fresh = True
        now = utcnow()
        self._renew_at = now + (leaf.not_valid_after_utc - now) / 2
        log.info(
            "server certificate for %s valid until %s",
            self._spiffe_id,
            leaf.not_valid_after_utc.isoformat(),
        )

    def credentials(self) -> grpc.ServerCredentials:
        assert self._config is not None, "renew_if_due() first"
        return grpc.dynamic_ssl_server_credentials(
            self._config, self._fetch, require_client_authentication=False
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake; returns a config only when it changed."""
        if self._fresh:
            self._fresh = False
            return self._config
        return None


@dataclass
class RunningServer:
    """A started CA; ``stop()`` shuts everything down."""

    settings: Settings
    store: Store
    signer: Signer
    authority: Authority
    authenticator: Authenticator
    grpc_server: aio.Server
    http_runner: web.AppRunner
    grpc_port: int
    http_port: int
    server_cert: ServerCertificate | None
    metrics: CAMetrics
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def status_line(self) -> str:
        s = self.settings
        grpc_host, _ = split_host_port(s.grpc_listen, "grpc_listen")
        http_host, _ = split_host_port(s.http_listen, "http_listen")
        issuing = self.authority.current_issuing_ca
        return (
            f"meshca ready: trust domain {s.trust_domain}; "
            f"gRPC {'plaintext' if s.plaintext else 'TLS'} on {grpc_host}:{self.grpc_port}; "
            f"HTTP on {http_host}:{self.http_port}; "
            f"root {fingerprint(self.authority.root_certificate)[:16]} "
            f"({self.signer.backend}: {self.signer.key_id}); "
            f"intermediate valid until {issuing.not_after.isoformat() if issuing else '-'}; "
            f"database {self.store.redacted_url()}"
        )

    async def maintain(self) -> None:
        """Rotate the intermediate, renew the server certificate, reload the bundle."""
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL.total_seconds())
            try:
                await self.authority.issuing_ca()
                if self.server_cert is not None:
                    await self.server_cert.renew_if_due(self.settings.max_ttl)
                await self.authority.refresh_trust_bundle()
            except MeshcaError as exc:
                log.warning("maintenance failed, will retry: %s", exc)

    async def stop(self, grace: float = 5.0) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.grpc_server.stop(grace)
        await self.http_runner.cleanup()
        closer = getattr(self.authenticator, "close", None)
        if closer is not None:
            await closer()
        await asyncio.to_thread(self.store.close)


def build_authenticator(settings: Settings) -> Authenticator:
    clusters = settings.effective_clusters
    if not clusters:
        log.warning("no Kubernetes cluster configured: every certificate request will be refused")
        return NoAuthenticator()
    return KubernetesAuthenticator(
        settings.trust_domain_value, clusters, default_cluster=settings.default_cluster
    )


async def start_server(settings: Settings) -> RunningServer:
    """Start every part of the CA; raise ConfigError/MeshcaError naming what failed."""
    trust_domain = settings.trust_domain_value
    grpc_host, grpc_port = split_host_port(settings.grpc_listen, "grpc_listen")
    http_host, http_port = split_host_port(settings.http_listen, "http_listen")

    store = await asyncio.to_thread(Store.open, settings.effective_database_url)
    signer, key_created = await asyncio.to_thread(
        open_signer, settings.signer, state_dir=settings.state_dir, create=True
    )
    if key_created:
        log.info("created root key %s (%s)", signer.key_id, signer.algorithm)
    root, _ = await asyncio.to_thread(
        load_active_root,
        store,
        signer,
        trust_domain,
        now=utcnow(),
        create_ttl=settings.root_ttl if signer.backend == "file" else None,
    )
    policy = IssuancePolicy(trust_domain, settings.max_ttl, settings.default_ttl)
    authority = Authority(
        trust_domain=trust_domain,
        root_signer=signer,
        root=root,
        store=store,
        policy=policy,
        intermediate=IntermediateSettings(
            ttl=settings.intermediate_ttl,
            rotate_fraction=settings.intermediate_rotate_fraction,
            name_constraints=settings.intermediate_name_constraints,
        ),
    )
    await authority.refresh_trust_bundle()
    await authority.issuing_ca()

    metrics = CAMetrics()
    metrics.track_expiry(
        lambda: root.not_after,
        lambda: ca.not_after if (ca := authority.current_issuing_ca) else None,
    )
    authenticator = build_authenticator(settings)
    frontend = CertificateFrontend(authority, authenticator, metrics)

    grpc_server = aio.server(options=list(SERVER_OPTIONS))
    add_services(grpc_server, frontend)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    server_cert: ServerCertificate | None = None
    address = f"[{grpc_host}]:{grpc_port}" if ":" in grpc_host else f"{grpc_host}:{grpc_port}"
    try:
        if settings.plaintext:
            bound = grpc_server.add_insecure_port(address)
        else:
            server_cert = ServerCertificate(
                authority, SpiffeId(trust_domain, "/meshca"), settings.server_dns_names
            )
            await server_cert.renew_if_due(settings.max_ttl)
            bound = grpc_server.add_secure_port(address, server_cert.credentials())
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen for gRPC on {settings.grpc_listen}: {exc}") from exc
    if not bound:
        raise ConfigError(f"cannot listen for gRPC on {settings.grpc_listen}")
    await grpc_server.start()
    for service in (*SERVICE_NAMES, ""):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def check_signer() -> None:
        await asyncio.to_thread(signer.sign, b"meshca readiness probe")

    async def check_database() -> None:
        await asyncio.to_thread(store.ping)

    checks: dict[str, Callable[[], Awaitable[None]]] = {
        "signer": check_signer,
        "database": check_database,
    }
    runner = web.AppRunner(build_app(authority, metrics, checks), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, http_host, http_port)
    try:
        await site.start()
    except OSError as exc:
        await grpc_server.stop(0)
        raise ConfigError(f"cannot listen for HTTP on {settings.http_listen}: {exc}") from exc
    http_bound = runner.addresses[0][1]

    running = RunningServer(
        settings=settings,
        store=store,
        signer=signer,
        authority=authority,
        authenticator=authenticator,
        grpc_server=grpc_server,
        http_runner=runner,
        grpc_port=bound,
        http_port=http_bound,
        server_cert=server_cert,
        metrics=metrics,
    )
    running._tasks.append(asyncio.create_task(running.maintain()))
    return running


async def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, then stop gracefully."""
    running = await start_server(settings)
    log.info(running.status_line())
    print(running.status_line(), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await running.stop()
