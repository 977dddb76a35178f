"""Prometheus metrics of the CA.

One process: a registry of its own (several CAs can run in one test process). Several
worker processes (``--workers``): prometheus-client's multiprocess mode, enabled by the
supervisor through ``PROMETHEUS_MULTIPROC_DIR`` before the workers start; any worker's
``/metrics`` then reports the sum over all of them (and, for the expiry gauges, the
soonest expiry among live workers).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

Expiry = Callable[[], datetime | None]


class CAMetrics:
    """Issued, refused by reason, authentication failures, latency, time to expiry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.issued = Counter(
            "meshca_certificates_issued",
            "Certificates issued, by API and authentication method.",
            ["api", "method"],
            registry=self.registry,
        )
        self.refused = Counter(
            "meshca_requests_refused",
            "Certificate requests refused, by API and reason.",
            ["api", "reason"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "meshca_authentication_failures",
            "Callers whose credential was not accepted, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "meshca_issuance_seconds",
            "Time from receiving a certificate request to answering it (issued or refused).",
            ["api", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http_connections = Gauge(
            "meshca_http_connections",
            "Open connections on the HTTP port (bundle, health, metrics).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.http_refused = Counter(
            "meshca_http_connections_refused",
            "HTTP connections closed on arrival, by reason (cap: the process's cap was "
            "reached; peer_cap: that peer address holds its share).",
            ["reason"],
            registry=self.registry,
        )
        self.http_timed_out = Counter(
            "meshca_http_connections_timed_out",
            "HTTP connections closed for sending no complete request in time.",
            registry=self.registry,
        )
        self.http_bad_requests = Counter(
            "meshca_http_bad_requests",
            "Malformed HTTP requests (answered 400 and closed).",
            registry=self.registry,
        )
        self._root_expiry = Gauge(
            "meshca_root_expiry_seconds",
            "Seconds until the active root CA certificate expires.",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self._intermediate_expiry = Gauge(
            "meshca_intermediate_expiry_seconds",
            "Seconds until the soonest-expiring issuing intermediate of a live process expires.",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.root_expiry_warning = Gauge(
            "meshca_root_expiry_warning",
            "1 while the active root is within root_expiry_warning of its notAfter "
            "(rotate it: `meshca admin root prepare`), else 0.",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self._expiry_sources: tuple[Expiry, Expiry] | None = None

    def track_expiry(self, root_not_after: Expiry, intermediate_not_after: Expiry) -> None:
        """Where the expiry gauges read their deadlines; updated by :meth:`update_expiry`."""
        self._expiry_sources = (root_not_after, intermediate_not_after)
        self.update_expiry()

    def update_expiry(self) -> None:
        if self._expiry_sources is None:
            return
        now = datetime.now(UTC)
        for gauge, source in zip(
            (self._root_expiry, self._intermediate_expiry), self._expiry_sources, strict=True
        ):
            when = source()
            gauge.set((when - now).total_seconds() if when else float("nan"))

    def exposition(self) -> bytes:
        """The text exposition format, current to this moment."""
        self.update_expiry()
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
