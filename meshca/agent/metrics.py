"""The agent's Prometheus metrics, served with /healthz and /readyz by
:mod:`meshca.agent.http`.

Metrics (each agent has a registry of its own, so many agents can run in one process):

    meshca_agent_certificate_expiry_seconds         seconds until the current SVID expires
    meshca_agent_renewals_total{via}                certificates obtained (token / svid)
    meshca_agent_renewal_failures_total{reason}     failed attempts, by reason
    meshca_agent_last_renewal_timestamp_seconds     Unix time of the last success
    meshca_agent_consecutive_failures               failures since the last success
    meshca_agent_renewal_seconds                    time of a successful request
    meshca_agent_trust_bundle_roots                 roots in the trust bundle
    meshca_agent_bundle_refresh_failures_total{reason}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from meshca.agent.credentials import CredentialStore
from meshca.agent.http import METRICS_CONTENT_TYPE, Answer, HealthServer, readiness
from meshca.errors import ConfigError

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AgentMetrics:
    """Counters and gauges of one agent; the expiry gauge reads the store at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.renewals = Counter(
            "meshca_agent_renewals",
            "Certificates obtained from the CA, by how the agent authenticated.",
            ["via"],
            registry=self.registry,
        )
        self.failures = Counter(
            "meshca_agent_renewal_failures",
            "Failed attempts to obtain a certificate, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.last_success = Gauge(
            "meshca_agent_last_renewal_timestamp_seconds",
            "Unix time of the last certificate obtained (0: none yet).",
            registry=self.registry,
        )
        self.consecutive_failures = Gauge(
            "meshca_agent_consecutive_failures",
            "Failed attempts since the last certificate obtained.",
            registry=self.registry,
        )
        self.latency = Histogram(
            "meshca_agent_renewal_seconds",
            "Time of a successful certificate request, key generation included.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.bundle_roots = Gauge(
            "meshca_agent_trust_bundle_roots",
            "Roots in the trust bundle handed to the data plane.",
            registry=self.registry,
        )
        self.bundle_failures = Counter(
            "meshca_agent_bundle_refresh_failures",
            "Failed trust bundle refreshes, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self._expiry = Gauge(
            "meshca_agent_certificate_expiry_seconds",
            "Seconds until the certificate the agent serves expires (negative: expired; "
            "NaN: none yet).",
            registry=self.registry,
        )

        self.workload_identities = Gauge(
            "meshca_agent_workload_identities",
            "Identities a node agent holds a certificate (or is getting one) for.",
            registry=self.registry,
        )
        self.callers_refused = Counter(
            "meshca_agent_callers_refused",
            "Workload API and SDS callers a node agent gave no identity, by reason.",
            ["reason"],
            registry=self.registry,
        )

    def track(self, store: CredentialStore) -> None:
        """Read the expiry gauge from ``store`` at every scrape."""
        self.track_soonest(lambda: [store])

    def track_soonest(self, stores: Callable[[], list[CredentialStore]]) -> None:
        """Read the expiry gauge at every scrape: the certificate that expires first
        among ``stores()`` (a node agent holds one per workload identity)."""

        def seconds_left() -> float:
            held = [c for c in (s.current() for s in stores()) if c is not None]
            if not held:
                return math.nan
            soonest = min(c.not_after for c in held)
            return (soonest - datetime.now(UTC)).total_seconds()

        self._expiry.set_function(seconds_left)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def start_http(
    host: str,
    port: int,
    store: CredentialStore,
    metrics: AgentMetrics,
    ready: Callable[[], Answer] | None = None,
) -> tuple[HealthServer, int]:
    """Serve health and metrics on ``host:port`` (0: any free port); returns the server
    and the bound port. ``/readyz`` asks ``ready`` (default: whether ``store`` holds an
    unexpired certificate). Raises OSError when the address cannot be bound.
    """
    server = HealthServer(
        {
            b"/healthz": lambda: Answer(200, b"ok\n"),
            b"/readyz": ready if ready is not None else lambda: readiness(store),
            b"/metrics": lambda: Answer(200, metrics.exposition(), METRICS_CONTENT_TYPE),
        }
    )
    return server, await server.start(host, port)


async def listen_http(
    listen: str,
    store: CredentialStore,
    metrics: AgentMetrics,
    ready: Callable[[], Answer] | None = None,
) -> tuple[HealthServer, int]:
    """:func:`start_http` on ``--http-listen``'s ``HOST:PORT`` (an IPv6 host in brackets);
    an address that cannot be bound is a ConfigError naming it."""
    host, _, port = listen.rpartition(":")
    try:
        return await start_http(host.strip("[]"), int(port), store, metrics, ready)
    except OSError as exc:
        raise ConfigError(f"cannot listen for HTTP on {listen}: {exc.strerror or exc}") from exc
