"""HTTP endpoints (aiohttp): trust bundle, health, readiness, Prometheus metrics.

GET /v1/bundle                  PEM trust bundle (every root relying parties trust)
GET /v1/bundle?format=spiffe    SPIFFE bundle JSON (JWKS with x509-svid keys)
GET /healthz                    the process is up
GET /readyz                     200 only when the signer signs and a ledger append could
                                succeed now; else 503 naming each failure
GET /metrics                    Prometheus text format
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST

from meshca.ca.authority import Authority
from meshca.errors import MeshcaError
from meshca.metrics import CAMetrics
from meshca.pki.bundle import bundle_pem, spiffe_bundle

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[None]]
BUNDLE_REFRESH_HINT = timedelta(minutes=5)
READINESS_TIMEOUT_SECONDS = 5.0

AUTHORITY_KEY = web.AppKey("authority", Authority)
METRICS_KEY = web.AppKey("metrics", CAMetrics)
CHECKS_KEY = web.AppKey("checks", dict[str, ReadinessCheck])


class CachedCheck:
    """A readiness check that runs at most once per period, however often it is asked.

    /readyz is unauthenticated: a probe that locks the ledger head or signs on a KMS must not
    run once per request. Concurrent probes share the run in flight; its outcome, success or
    failure, answers every probe until it is ``ok_for`` / ``failed_for`` seconds old.
    """

    def __init__(
        self,
        check: ReadinessCheck,
        *,
        ok_for: float,
        failed_for: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check = check
        self._ok_for = ok_for
        self._failed_for = failed_for
        self._clock = clock
        self._valid_until = float("-inf")
        self._failure: MeshcaError | None = None
        self._running: asyncio.Future[None] | None = None

    async def __call__(self) -> None:
        if self._clock() < self._valid_until:
            if self._failure is not None:
                raise self._failure.with_traceback(None)
            return
        if self._running is None:
            self._running = asyncio.ensure_future(self._run())
            # Read the outcome even when every probe gave up waiting, or asyncio reports a
            # failed run as "exception was never retrieved".
            self._running.add_done_callback(_read_outcome)
        # shield: a probe that times out must not cancel the run the others wait for.
        await asyncio.shield(self._running)

    async def _run(self) -> None:
        try:
            await self._check()
        except MeshcaError as exc:
            self._failure, self._valid_until = exc, self._clock() + self._failed_for
            raise
        else:
            self._failure, self._valid_until = None, self._clock() + self._ok_for
        finally:
            self._running = None


def _read_outcome(run: asyncio.Future[None]) -> None:
    if not run.cancelled():
        run.exception()


async def bundle(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY_KEY]
    certs = authority.trust_bundle()
    fmt = request.query.get("format", "pem")
    if fmt == "pem":
        return web.Response(text=bundle_pem(certs), content_type="application/x-pem-file")
    if fmt == "spiffe":
        doc = spiffe_bundle(authority.trust_domain, certs, refresh_hint=BUNDLE_REFRESH_HINT)
        return web.Response(text=json.dumps(doc, indent=2), content_type="application/json")
    raise web.HTTPBadRequest(text=f"unknown format {fmt[:40]!r}; use 'pem' or 'spiffe'\n")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Run every readiness check; 503 with the failing ones named."""
    failures: list[str] = []
    for name, check in request.app[CHECKS_KEY].items():
        try:
            await asyncio.wait_for(check(), READINESS_TIMEOUT_SECONDS)
        except TimeoutError:
            failures.append(f"{name}: no answer within {READINESS_TIMEOUT_SECONDS:g}s")
        except MeshcaError as exc:
            failures.append(f"{name}: {exc.message}")
    if failures:
        return web.Response(status=503, text="not ready\n" + "\n".join(failures) + "\n")
    return web.Response(text="ready\n")


async def metrics(request: web.Request) -> web.Response:
    resp = web.Response(body=request.app[METRICS_KEY].exposition())
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return resp


def build_app(
    authority: Authority,
    ca_metrics: CAMetrics,
    checks: dict[str, ReadinessCheck],
    *,
    middlewares: Iterable[Middleware] = (),
) -> web.Application:
    app = web.Application(client_max_size=4096, middlewares=middlewares)
    app[AUTHORITY_KEY] = authority
    app[METRICS_KEY] = ca_metrics
    app[CHECKS_KEY] = checks
    app.router.add_get("/v1/bundle", bundle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
