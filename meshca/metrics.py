"""Prometheus metrics of one CA process, on a registry of its own (several per test run)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class CAMetrics:
    """Issued, refused by reason, authentication failures, latency, time to expiry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
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
        self._root_expiry = Gauge(
            "meshca_root_expiry_seconds",
            "Seconds until the active root CA certificate expires.",
            registry=self.registry,
        )
        self._intermediate_expiry = Gauge(
            "meshca_intermediate_expiry_seconds",
            "Seconds until this process's issuing intermediate expires.",
            registry=self.registry,
        )

    def track_expiry(
        self,
        root_not_after: Callable[[], datetime | None],
        intermediate_not_after: Callable[[], datetime | None],
    ) -> None:
        """Compute the expiry gauges at scrape time from the given accessors."""

        def seconds_until(get: Callable[[], datetime | None]) -> Callable[[], float]:
            def value() -> float:
                when = get()
                if when is None:
                    return float("nan")
                return (when - datetime.now(UTC)).total_seconds()

            return value

        self._root_expiry.set_function(seconds_until(root_not_after))
        self._intermediate_expiry.set_function(seconds_until(intermediate_not_after))
