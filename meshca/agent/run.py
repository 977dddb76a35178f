"""Composition root of ``meshca agent``: store, CA client, rotation, sinks, HTTP.

Start-up order: check the credential (a missing token file is reported at once, naming
the path); build the CA client and the trust anchors; build every delivery path the
settings turn on (so a bad option fails before anything listens) and start them, so that
Envoy and SPIFFE clients can connect and wait; start the health and metrics server;
then start the rotation engine, which requests a fresh certificate at once. One status
line is printed when the first certificate is in the store.

Sinks are imported only when turned on: ``meshca.agent.sds.SdsServer``,
``meshca.agent.workload_api.WorkloadApiServer``, ``meshca.agent.filesink.FileSink``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshca.agent.client import CAClient
from meshca.agent.config import AgentSettings
from meshca.agent.credential_sources import (
    JoinTokenFile,
    ProjectedTokenFile,
    credential_source,
)
from meshca.agent.credentials import (
    CredentialSink,
    CredentialStore,
    X509Credentials,
    stop_sinks,
)
from meshca.agent.http import HealthServer
from meshca.agent.metrics import AgentMetrics, listen_http
from meshca.agent.rotation import Backoff, RenewalSchedule, RotationEngine
from meshca.agent.trust import BundleFile, BundleSource, PinnedBundleUrl, TrustAnchors
from meshca.errors import ConfigError, SpiffeIdError
from meshca.pki.keys import KeyAlgorithm, UnsupportedKeyError
from meshca.spiffe import SpiffeId

if TYPE_CHECKING:
    from meshca.agent.identities import CallerStores
    from meshca.agent.node import RunningNodeAgent
    from meshca.proxy.run import RunningProxy

log = logging.getLogger(__name__)


@dataclass
class RunningAgent:
    """A started agent; ``stop()`` shuts everything down."""

    settings: AgentSettings
    store: CredentialStore
    client: CAClient
    engine: RotationEngine
    metrics: AgentMetrics
    sinks: list[tuple[str, CredentialSink]]
    http_server: HealthServer | None
    http_port: int | None
    task: asyncio.Task[None] = field(init=False)
    proxy: RunningProxy | None = None

    async def wait_ready(self) -> X509Credentials:
        """The first credentials (returns at once when there are some)."""
        return await self.store.wait_newer(0)

    def status_line(self) -> str:
        s = self.settings
        creds = self.store.current()
        identity = (
            f"{creds.spiffe_id} valid until {creds.not_after.isoformat()}"
            if creds
            else "no certificate yet"
        )
        renewal = self.engine.next_renewal
        http = "off"
        if s.http_listen is not None and self.http_port is not None:
            http = f"{s.http_listen.rpartition(':')[0]}:{self.http_port}"
        return (
            f"meshca agent ready: {identity}; "
            f"renewal at {renewal.isoformat(timespec='seconds') if renewal else '-'}; "
            f"CA {self.client.describe()}; trust {self.client.anchors.description}; "
            f"credential {s.credential} ({self.client.credential.description}); "
            f"delivery {', '.join(self.delivery()) or 'none'}; "
            f"HTTP on {http}"
        )

    def renew_now(self) -> None:
        """SIGHUP: renew at once."""
        self.engine.renew_now()

    def delivery(self) -> list[str]:
        names = [name for name, _ in self.sinks]
        if self.proxy is not None:
            names += [f"mTLS proxy {r}" for r in self.proxy.routes()]
        return names

    async def stop(self) -> None:
        if self.proxy is not None:
            await self.proxy.stop()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await stop_sinks(self.sinks)
        if self.http_server is not None:
            await self.http_server.stop()
        await self.client.close()


def bundle_source(settings: AgentSettings) -> BundleSource | None:
    td = settings.trust_domain_value
    if settings.ca_trust_bundle is not None:
        return BundleFile(settings.ca_trust_bundle, td)
    if settings.ca_bundle_url is not None:
        return PinnedBundleUrl(
            settings.ca_bundle_url, settings.ca_bundle_sha256, td, settings.request_timeout
        )
    return None


def load_svid(cert_file: Path, key_file: Path, settings: AgentSettings) -> X509Credentials:
    """The SVID a ``credential: svid`` agent starts from; ConfigError when unusable.

    The chain file holds the leaf first, then intermediates; a root at the end is
    dropped. The key is used only to authenticate the first renewal.
    """
    try:
        certs = x509.load_pem_x509_certificates(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read the bootstrap SVID: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"the bootstrap SVID {cert_file} / {key_file} is unusable: {exc}"
        ) from None
    chain = tuple(c for c in certs if c.subject != c.issuer)
    if not chain:
        raise ConfigError(f"{cert_file} holds no X509-SVID")
    try:
        KeyAlgorithm.of(key)
    except UnsupportedKeyError as exc:
        raise ConfigError(f"the bootstrap SVID key {key_file}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"the bootstrap SVID key {key_file} is not an ECDSA or RSA key")
    leaf = chain[0]
    if leaf.public_key() != key.public_key():
        raise ConfigError(f"the key in {key_file} does not belong to the SVID in {cert_file}")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        (uri,) = san.get_values_for_type(x509.UniformResourceIdentifier)
        spiffe_id = SpiffeId.parse(uri)
    except (x509.ExtensionNotFound, ValueError, SpiffeIdError):
        raise ConfigError(
            f"{cert_file} is not an X509-SVID: it needs exactly one SPIFFE ID URI SAN"
        ) from None
    if not spiffe_id.member_of(settings.trust_domain_value):
        raise ConfigError(
            f"the bootstrap SVID {spiffe_id} is not in trust domain {settings.trust_domain}"
        )
    return X509Credentials(spiffe_id, key, chain, ())


def earlier_svid(settings: AgentSettings) -> X509Credentials | None:
    """The unexpired SVID a join-token agent wrote to ``output_dir`` on an earlier run,
    to renew with after a restart (its token is spent); None when there is none."""
    if settings.output_dir is None:
        return None
    cert, key = settings.output_dir / "cert-chain.pem", settings.output_dir / "key.pem"
    if not cert.exists() or not key.exists():
        return None
    try:
        svid = load_svid(cert, key, settings)
    except ConfigError as exc:
        log.warning("not renewing with the SVID in %s: %s", settings.output_dir, exc)
        return None
    if svid.not_after <= datetime.now(UTC):
        log.warning(
            "the SVID in %s expired at %s; asking with the join token",
            settings.output_dir,
            svid.not_after.isoformat(),
        )
        return None
    log.info(
        "renewing with the SVID for %s in %s (valid until %s); the join token is not needed",
        svid.spiffe_id,
        settings.output_dir,
        svid.not_after.isoformat(),
    )
    return svid


def build_client(settings: AgentSettings) -> CAClient:
    """The CA client the settings describe (ConfigError for an unavailable credential)."""
    return CAClient(
        address=settings.ca_address,
        anchors=TrustAnchors(bundle_source(settings), settings.trust_domain_value),
        credential=credential_source(
            settings.credential,
            settings.token_file,
            gce_metadata_url=settings.gce_metadata_url,
            gce_audience=settings.effective_gce_audience,
            timeout=settings.request_timeout,
        ),
        server_name=settings.server_name,
        timeout=settings.request_timeout,
        mtls_address=settings.mtls_address,
        cluster_id=settings.cluster_id,
    )


def build_sinks(
    settings: AgentSettings, callers: CallerStores | None = None
) -> list[tuple[str, CredentialSink]]:
    """The delivery paths the settings turn on (ConfigError from their constructors).
    With ``callers`` (a node agent) the sockets serve each caller its own identity."""
    sinks: list[tuple[str, CredentialSink]] = []
    if settings.sds_socket is not None:
        from meshca.agent.sds import SdsServer

        sinks.append(
            (
                f"SDS {settings.sds_socket}",
                SdsServer(
                    settings.sds_socket,
                    socket_mode=settings.socket_mode,
                    owner=settings.socket_owner,
                    group=settings.socket_group,
                    callers=callers,
                ),
            )
        )
    if settings.workload_api_socket is not None:
        from meshca.agent.workload_api import WorkloadApiServer

        sinks.append(
            (
                f"Workload API {settings.workload_api_socket}",
                WorkloadApiServer(
                    settings.workload_api_socket,
                    socket_mode=settings.socket_mode,
                    owner=settings.socket_owner,
                    group=settings.socket_group,
                    callers=callers,
                ),
            )
        )
    if settings.output_dir is not None:
        from meshca.agent.filesink import FileSink

        sinks.append(
            (
                f"files {settings.output_dir}",
                FileSink(
                    settings.output_dir,
                    reload_command=settings.reload_argv,
                    reload_signal=settings.reload_signal_number,
                    reload_pid_file=settings.reload_pid_file,
                ),
            )
        )
    return sinks


def own_bootstrap(settings: AgentSettings) -> X509Credentials | None:
    """The SVID the agent starts from: the configured one (``svid``), or the one a
    join-token agent wrote on an earlier run."""
    if settings.credential == "svid":
        assert settings.svid_cert_file is not None and settings.svid_key_file is not None
        return load_svid(settings.svid_cert_file, settings.svid_key_file, settings)
    if settings.credential == "join-token":
        return earlier_svid(settings)
    return None


async def check_credential(
    settings: AgentSettings, client: CAClient, bootstrap: X509Credentials | None = None
) -> None:
    """Check the local files the operator named now, so that a typo is reported at once
    (naming the path) rather than retried in the background."""
    if isinstance(client.credential, ProjectedTokenFile) or (
        isinstance(client.credential, JoinTokenFile) and bootstrap is None
    ):
        await client.credential.token()
    if isinstance(client.anchors.source, BundleFile):
        await client.anchors.refresh()
    if settings.ca_plaintext:
        log.warning(
            "ca_plaintext: talking to the CA without TLS and trusting whatever root it "
            "names. For local development only."
        )


async def start_agent(settings: AgentSettings) -> RunningAgent:
    """Start every part of the agent; raise ConfigError/MeshcaError naming what failed."""
    client = build_client(settings)
    bootstrap = own_bootstrap(settings)
    await check_credential(settings, client, bootstrap)
    sinks = build_sinks(settings)
    store = CredentialStore()
    metrics = AgentMetrics()
    engine = RotationEngine(
        client=client,
        store=store,
        key_type=settings.key_type,
        ttl=settings.ttl,
        schedule=RenewalSchedule(settings.renew_ratio, settings.renew_jitter),
        backoff=Backoff(settings.backoff_initial, settings.backoff_max),
        metrics=metrics,
        credential=settings.credential,
        bootstrap=bootstrap,
        bundle_refresh=settings.bundle_refresh_interval,
    )
    started: list[tuple[str, CredentialSink]] = []
    http_server: HealthServer | None = None
    http_port: int | None = None
    try:
        for name, sink in sinks:
            await sink.start(store)
            started.append((name, sink))
        if settings.http_listen is not None:
            http_server, http_port = await listen_http(settings.http_listen, store, metrics)
            host = settings.http_listen.rpartition(":")[0]
            log.info("health and metrics on %s:%d", host, http_port)
    except BaseException:
        for _, sink in reversed(started):
            await sink.stop()
        await client.close()
        raise
    agent = RunningAgent(
        settings=settings,
        store=store,
        client=client,
        engine=engine,
        metrics=metrics,
        sinks=sinks,
        http_server=http_server,
        http_port=http_port,
    )
    agent.task = asyncio.create_task(engine.run(), name="meshca-agent-rotation")
    proxy_config = settings.proxy_config
    if proxy_config is not None:
        from meshca.proxy.run import start_proxy

        try:  # the proxy takes its credentials straight from the rotation engine's store
            agent.proxy = await start_proxy(proxy_config, store)
        except BaseException:
            await agent.stop()
            raise
    return agent


async def run_agent(settings: AgentSettings) -> None:
    """Run the agent until SIGINT or SIGTERM, then stop cleanly. SIGHUP renews at once."""
    agent: RunningAgent | RunningNodeAgent
    if settings.attestation == "none":
        agent = await start_agent(settings)
    else:
        from meshca.agent.node import start_node_agent

        agent = await start_node_agent(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, agent.renew_now)
    stopping = asyncio.create_task(stop.wait())
    ready = asyncio.create_task(agent.wait_ready())
    log.info(
        "meshca agent starting: CA %s, credential %s", settings.ca_address, settings.credential
    )
    try:
        pending = {stopping, ready, agent.task}
        while not stopping.done() and not agent.task.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if ready in done:
                # Once, on standard output: the log would repeat it in the same terminal.
                print(agent.status_line(), flush=True)
        if agent.task.done():
            agent.task.result()  # the engine only ends by a bug: let it show
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in (stopping, ready):
            task.cancel()
        log.info("shutting down")
        await agent.stop()
