"""One writer among many CA processes: a coordination.k8s.io/v1 Lease.

The algorithm is client-go's leader election (``k8s.io/client-go/tools/leaderelection``):
every candidate looks at the Lease each ``retry_period``; the holder renews it (writes
``renewTime``); another candidate takes it over only once the record it last saw has not
changed for ``leaseDurationSeconds`` by its own clock (so clocks need not agree), or when
the holder released it (empty ``holderIdentity``, as a holder stopping cleanly leaves
it). Every write carries the ``resourceVersion`` read, so of two candidates racing for
an expired Lease the API server lets one win (409 Conflict for the other). The holder
stops its work as soon as it has not renewed for ``renew_deadline``, which is shorter
than the Lease's duration: it has stopped before anyone else may start.

The ``kubernetes`` package ships an elector too; it is not used because it gives its
API calls no timeout (a hung API server would keep a lost leader writing for minutes),
lets a connection error escape its loop without stopping the leader's task, records
local time as UTC, and never releases the Lease on a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
from kubernetes.aio.client import ApiClient, CoordinationV1Api, V1Lease, V1LeaseSpec, V1ObjectMeta
from kubernetes.aio.client.exceptions import ApiException

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    namespace: str
    name: str
    identity: str
    lease_duration: timedelta
    renew_deadline: timedelta
    retry_period: timedelta
    timeout: timedelta


def api_problem(exc: BaseException) -> str:
    """A one-line reason for a failed API call (never a token: the client logs none)."""
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason or ''}".rstrip()
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


API_ERRORS = (ApiException, aiohttp.ClientError, TimeoutError)


class LeaseElector:
    """Runs ``lead`` while this process holds the Lease; see the module docstring."""

    def __init__(self, api: ApiClient, settings: LeaseSettings) -> None:
        self._api = CoordinationV1Api(api)
        self._settings = settings
        self._observed: tuple[object, ...] | None = None
        self._observed_at = 0.0
        self._last_problem: str | None = None
        self.leading = False

    async def run(self, lead: Callable[[], Awaitable[None]]) -> None:
        """Forever: wait for the Lease, run ``lead`` while holding it, cancel it when the
        Lease is lost. Cancelling ``run`` cancels ``lead`` and releases the Lease."""
        s = self._settings
        retry = s.retry_period.total_seconds()
        try:
            while True:
                while not await self._try_acquire_or_renew():
                    await asyncio.sleep(retry)
                await self._lead(lead)
        finally:
            if self.leading:
                self.leading = False
                await asyncio.shield(self._release())

    async def _lead(self, lead: Callable[[], Awaitable[None]]) -> None:
        s = self._settings
        self.leading = True
        log.info("holding Lease %s/%s as %s: writing", s.namespace, s.name, s.identity)
        work = asyncio.create_task(_run_lead(lead), name="meshca-lease-holder")
        renewed = time.monotonic()
        try:
            while time.monotonic() - renewed < s.renew_deadline.total_seconds():
                await asyncio.sleep(s.retry_period.total_seconds())
                if work.done():  # it runs until cancelled: it failed, so start it again
                    problem = work.exception() if not work.cancelled() else None
                    log.error("the Lease holder's work stopped (%r); starting it again", problem)
                    work = asyncio.create_task(_run_lead(lead), name="meshca-lease-holder")
                if await self._try_acquire_or_renew():
                    renewed = time.monotonic()
            log.warning(
                "lost Lease %s/%s: not renewed for %s; stopped writing",
                s.namespace,
                s.name,
                s.renew_deadline,
            )
            self.leading = False
        finally:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work

    async def _try_acquire_or_renew(self) -> bool:
        s = self._settings
        timeout = s.timeout.total_seconds()
        now = datetime.now(UTC)
        duration = max(1, math.ceil(s.lease_duration.total_seconds()))
        try:
            try:
                lease = await self._api.read_namespaced_lease(
                    s.name, s.namespace, _request_timeout=timeout
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
                return await self._create(now, duration)
            spec = lease.spec or V1LeaseSpec()
            holder = spec.holder_identity or None
            record = (
                holder,
                spec.renew_time,
                lease.metadata.resource_version if lease.metadata else None,
            )
            if record != self._observed:
                self._observed, self._observed_at = record, time.monotonic()
            held_for = spec.lease_duration_seconds or duration
            if (
                holder is not None
                and holder != s.identity
                and time.monotonic() < self._observed_at + held_for
            ):
                return False
            if holder != s.identity:
                spec.acquire_time = now
                spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.holder_identity = s.identity
            spec.renew_time = now
            spec.lease_duration_seconds = duration
            lease.spec = spec
            try:
                await self._api.replace_namespaced_lease(
                    s.name, s.namespace, lease, _request_timeout=timeout
                )
            except ApiException as exc:
                if exc.status == 409:  # another candidate wrote first
                    return False
                raise
        except API_ERRORS as exc:
            self._problem(f"cannot read or renew Lease {s.namespace}/{s.name}: {api_problem(exc)}")
            return False
        self._last_problem = None
        return True

    async def _create(self, now: datetime, duration: int) -> bool:
        s = self._settings
        lease = V1Lease(
            metadata=V1ObjectMeta(name=s.name, namespace=s.namespace),
            spec=V1LeaseSpec(
                holder_identity=s.identity,
                lease_duration_seconds=duration,
                acquire_time=now,
                renew_time=now,
                lease_transitions=0,
            ),
        )
        try:
            await self._api.create_namespaced_lease(
                s.namespace, lease, _request_timeout=s.timeout.total_seconds()
            )
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def _release(self) -> None:
        """Leave the Lease free for the others at once (a clean stop)."""
        s = self._settings
        timeout = s.timeout.total_seconds()
        try:
            lease = await self._api.read_namespaced_lease(
                s.name, s.namespace, _request_timeout=timeout
            )
            if lease.spec is None or lease.spec.holder_identity != s.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = datetime.now(UTC)
            await self._api.replace_namespaced_lease(
                s.name, s.namespace, lease, _request_timeout=timeout
            )
            log.info("released Lease %s/%s", s.namespace, s.name)
        except API_ERRORS as exc:
            log.warning(
                "could not release Lease %s/%s (the others take over when it expires): %s",
                s.namespace,
                s.name,
                api_problem(exc),
            )

    def _problem(self, message: str) -> None:
        if message != self._last_problem:
            log.warning("%s", message)
        self._last_problem = message


async def _run_lead(lead: Callable[[], Awaitable[None]]) -> None:
    await lead()
