"""Composition root of ``meshca proxy`` (and of the proxy inside ``meshca agent``).

:func:`start_proxy` binds every listener at once (connections made before the first
certificate are refused with a log line, and /readyz says "not ready"), follows the
credential store (a new pair of TLS contexts per publication) and checks the policy file
and the access-log path once a second. :func:`run_proxy` runs it until SIGTERM; SIGHUP
reopens the access log and re-reads the policy. With ``--workers N`` (N > 1),
:mod:`meshca.proxy.workers` starts N such processes on the same ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from meshca.agent.credentials import CredentialStore
from meshca.api.http_guard import raise_file_limit
from meshca.errors import ConfigError
from meshca.proxy.accesslog import AccessLog
from meshca.proxy.config import Limits, ProxyConfig, split_host_port
from meshca.proxy.listeners import (
    NOT_READY,
    Acceptor,
    Listener,
    ProxyState,
    inbound_acceptor,
    outbound_acceptor,
)
from meshca.proxy.metrics import ProxyMetrics, start_http
from meshca.proxy.policy import PolicyFile
from meshca.proxy.source import WorkloadApiSource
from meshca.proxy.tls import TlsContexts

log = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 1.0
BACKLOG = 1024
STOP_GRACE_SECONDS = 2.0
RETRY_SECONDS = 1.0  # loading new credentials that failed for want of descriptors or memory
RESERVED_DESCRIPTORS = 128  # listeners, logs, the Workload API, new credentials...
DESCRIPTORS_PER_CONNECTION = 2  # the peer's socket and the application's (or remote's)


@dataclass
class RunningProxy:
    """A started proxy; ``ports`` maps each LISTEN (as configured) to its bound port."""

    config: ProxyConfig
    state: ProxyState
    store: CredentialStore
    servers: list[Listener]
    ports: dict[str, int]
    source: WorkloadApiSource | None
    http_runner: web.AppRunner | None = None
    http_port: int | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def not_ready(self) -> str | None:
        if self.state.contexts is not None:
            return None
        if self.source is not None and self.source.last_error:
            return f"{NOT_READY} ({self.source.last_error})"
        return NOT_READY

    async def wait_ready(self) -> None:
        await self.store.wait_newer(0)
        while self.state.contexts is None:
            await asyncio.sleep(0.01)

    def reopen_logs(self) -> None:
        """SIGHUP: reopen the access log and re-read the policy."""
        try:
            self.state.access_log.reopen()
        except OSError as exc:
            log.error("access log %s: cannot reopen: %s", self.config.access_log, exc.strerror)
        self.state.policy.check()

    def routes(self) -> list[str]:
        return [
            f"inbound {i.listen} (port {self.ports[i.listen]}) -> {i.app[0]}:{i.app[1]}"
            for i in self.config.inbound
        ] + [
            f"outbound {o.listen} (port {self.ports[o.listen]}) -> {o.remote[0]}:{o.remote[1]}"
            for o in self.config.outbound
        ]

    def status_line(self) -> str:
        ctxs = self.state.contexts
        ident = (
            f"{ctxs.creds.spiffe_id} valid until {ctxs.creds.not_after.isoformat()}"
            if ctxs
            else "no certificate yet"
        )
        return f"meshca proxy ready: {ident}; {'; '.join(self.routes())}"

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE_SECONDS
        for conn in list(self.state.connections):
            conn.reason = conn.reason or "proxy stopping"
            conn.downstream.close()
            if conn.upstream is not None:
                conn.upstream.close()
        while self.state.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.state.connections):
            conn.downstream.abort()
            if conn.upstream is not None:
                conn.upstream.abort()
        if self.source is not None:
            await self.source.stop()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        self.state.access_log.close()


async def _follow(store: CredentialStore, state: ProxyState, min_version: str) -> None:
    """Build new TLS contexts for every publication of the credentials.

    Credentials OpenSSL refuses are skipped (the previous ones stay in force, logged). A
    system error (out of file descriptors or memory, as under a connection flood) is
    retried every :data:`RETRY_SECONDS` until it succeeds or newer credentials arrive:
    giving up would leave the proxy on its old SVID and its old bundle for good.
    """
    async for creds in store.updates():
        while True:
            try:
                state.contexts = TlsContexts.build(creds, min_version)
                break
            except (ssl.SSLError, ValueError) as exc:
                log.error("cannot use the X509-SVID %s: %s; keeping the previous one", creds, exc)
                break
            except OSError as exc:
                log.error(
                    "cannot load the X509-SVID %s: %s; keeping the previous one and "
                    "retrying in %gs",
                    creds,
                    exc.strerror or exc,
                    RETRY_SECONDS,
                )
            await asyncio.sleep(RETRY_SECONDS)
            current = store.current()
            if current is not None and current.version > creds.version:
                break  # the loop takes the newer ones
        if state.contexts is None or state.contexts.creds is not creds:
            continue
        state.metrics.not_after.set(creds.not_after.timestamp())
        log.info(
            "proxy: using X509-SVID %s serial %x (valid until %s)",
            creds.spiffe_id,
            creds.leaf.serial_number,
            creds.not_after.isoformat(),
        )


async def _housekeeping(state: ProxyState) -> None:
    while True:
        await asyncio.sleep(HOUSEKEEPING_SECONDS)
        state.policy.check()
        state.access_log.check_rotated()
        state.access_log.flush_suppressed()


async def start_proxy(
    config: ProxyConfig,
    store: CredentialStore | None = None,
    *,
    ports: dict[str, int] | None = None,
    serve_http: bool = True,
) -> RunningProxy:
    """Bind the listeners and start following credentials.

    ``store``: an in-process agent's store; without it the Workload API socket is used.
    ``ports``: concrete ports for LISTEN addresses given with port 0 (worker processes).
    Raises ConfigError naming what cannot be used.
    """
    source: WorkloadApiSource | None = None
    if store is None:
        if config.workload_api_socket is None:
            raise ConfigError(
                "no credentials: give --workload-api-socket PATH (the agent's "
                "--workload-api-socket), or run the proxy inside 'meshca agent'"
            )
        store = CredentialStore()
        source = WorkloadApiSource(config.workload_api_socket, store)
    state = ProxyState(
        policy=PolicyFile(config.policy_file),
        access_log=_open_access_log(config),
        limits=_fit_file_limit(config.limits),
        metrics=ProxyMetrics(),
    )
    listeners: list[tuple[str, Acceptor]] = [
        (i.listen, inbound_acceptor(state, i)) for i in config.inbound
    ] + [(o.listen, outbound_acceptor(state, o)) for o in config.outbound]
    servers: list[Listener] = []
    bound: dict[str, int] = {}
    try:
        for listen, accept in listeners:
            host, port = split_host_port(listen, "listen address")
            port = (ports or {}).get(listen, port)
            try:
                server = Listener.bind(host, port, accept, BACKLOG)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
            servers.append(server)
            bound[listen] = server.port
    except BaseException:
        for server in servers:
            server.close()
        state.access_log.close()
        raise
    running = RunningProxy(config, state, store, servers, bound, source)
    if config.http_listen is not None and serve_http:
        host, port = split_host_port(config.http_listen, "--http-listen")
        try:
            running.http_runner, running.http_port = await start_http(
                host, port, state.metrics, running.not_ready
            )
        except OSError as exc:
            await running.stop()
            raise ConfigError(
                f"cannot listen for HTTP on {config.http_listen}: {exc.strerror or exc}"
            ) from None
    running.tasks.append(asyncio.create_task(_follow(store, state, config.tls_min_version)))
    running.tasks.append(asyncio.create_task(_housekeeping(state)))
    if source is not None:
        source.start()
    return running


def _fit_file_limit(limits: Limits) -> Limits:
    """Raise the soft file limit to the hard one, and lower ``max_connections`` to what
    it allows (two descriptors a connection, :data:`RESERVED_DESCRIPTORS` kept for the
    rest), so that a flood meets the connection limit, with a log line per refusal,
    before the process runs out of descriptors (accepts paused, upstream connections
    and new credentials failing)."""
    files = raise_file_limit()
    fits = max(1, (files - RESERVED_DESCRIPTORS) // DESCRIPTORS_PER_CONNECTION)
    if limits.max_connections <= fits:
        return limits
    log.warning(
        "--max-connections %d is above what %d open files allow; using %d "
        "(raise the limit: ulimit -n, LimitNOFILE= in the systemd unit)",
        limits.max_connections,
        files,
        fits,
    )
    return dataclasses.replace(limits, max_connections=fits)


def _open_access_log(config: ProxyConfig) -> AccessLog:
    try:
        return AccessLog(config.access_log, config.access_log_refusal_rate)
    except OSError as exc:
        raise ConfigError(
            f"cannot open the access log {config.access_log}: {exc.strerror or exc}"
        ) from None


async def run_proxy(config: ProxyConfig) -> None:
    """Run one proxy process until SIGINT or SIGTERM; print one line once ready."""
    running = await start_proxy(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, running.reopen_logs)
    ready = asyncio.create_task(running.wait_ready())
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            print(running.status_line(), flush=True)  # once: the log would repeat it
            await stopping
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        ready.cancel()
        stopping.cancel()
        await running.stop()


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop when installed (faster TLS and socket I/O), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; a fallback only
        return asyncio.new_event_loop
    return uvloop.new_event_loop
