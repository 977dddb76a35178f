"""The proxy's Prometheus metrics and its health server (aiohttp).

GET /healthz    the process is up
GET /readyz     200 once the proxy holds a certificate (every worker, with --workers), else
                503 saying why
GET /metrics    Prometheus text format:

    meshca_proxy_connections_total{direction,decision}   closed connections
    meshca_proxy_handshake_failures_total{direction}     failed handshakes and refused SVIDs
    meshca_proxy_requests_total{direction}               HTTP requests (HTTP listeners)
    meshca_proxy_bytes_total{direction,way}              plaintext bytes, received / sent
    meshca_proxy_access_log_suppressed_total             refusals over the access-log rate
    meshca_proxy_certificate_not_after_timestamp_seconds notAfter of the SVID in use

With several worker processes the counters are summed through prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by the parent).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from meshca.metrics import MULTIPROC_ENV


class ProxyMetrics:
    """Counters of one proxy process (a registry of its own: tests run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Counter(
            "meshca_proxy_connections",
            "Connections closed, by direction and decision (allow, deny, error).",
            ["direction", "decision"],
            registry=self.registry,
        )
        self.handshake_failures = Counter(
            "meshca_proxy_handshake_failures",
            "TLS handshakes that failed or presented an unacceptable X509-SVID.",
            ["direction"],
            registry=self.registry,
        )
        self.requests = Counter(
            "meshca_proxy_requests",
            "HTTP/1.1 requests relayed on listeners declared HTTP.",
            ["direction"],
            registry=self.registry,
        )
        self.bytes = Counter(
            "meshca_proxy_bytes",
            "Plaintext bytes relayed, received from or sent to the peer.",
            ["direction", "way"],
            registry=self.registry,
        )
        self.log_suppressed = Counter(
            "meshca_proxy_access_log_suppressed",
            "Refused connections left out of the access log (over its refusal rate).",
            registry=self.registry,
        )
        self.not_after = Gauge(
            "meshca_proxy_certificate_not_after_timestamp_seconds",
            "Unix time at which the X509-SVID the proxy uses expires (0: none yet).",
            registry=self.registry,
            multiprocess_mode="livemin",
        )

    def exposition(self) -> bytes:
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


Readiness = Callable[[], str | None]  # None when ready, else why not


def build_http_app(metrics: ProxyMetrics, not_ready: Readiness) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        why = not_ready()
        if why is not None:
            return web.Response(status=503, text=f"not ready\n{why}\n")
        return web.Response(text="ready\n")

    async def metrics_page(request: web.Request) -> web.Response:
        resp = web.Response(body=metrics.exposition())
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    app = web.Application(client_max_size=4096)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


async def start_http(
    host: str, port: int, metrics: ProxyMetrics, not_ready: Readiness
) -> tuple[web.AppRunner, int]:
    """Serve health and metrics on ``host:port`` (0: any free port); OSError if unbindable."""
    runner = web.AppRunner(
        build_http_app(metrics, not_ready), access_log=None, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])
