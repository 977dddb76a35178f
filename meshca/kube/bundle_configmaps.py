"""The trust bundle in a ConfigMap in every namespace, kept current.

Istio's convention, which Istio's sidecars, gateways and many charts read: a ConfigMap
``istio-ca-root-cert`` with the CA's root certificates as PEM under ``root-cert.pem`` in
every namespace. The Lease holder (:mod:`meshca.kube.lease`) lists the namespaces,
writes the ConfigMap where it is missing or differs, then watches namespaces and writes
into each new one as it appears. It compares the bundle it publishes with the CA's own
(which follows the store: a prepared root joins it, a retired one leaves it) every
second and rewrites every ConfigMap when it changes. Every ``resync_interval`` it lists
everything again, repairing ConfigMaps edited or deleted meanwhile. A namespace being
deleted is skipped. API errors are logged once per distinct reason and retried.

RBAC it needs: namespaces get, list, watch; configmaps create, and get and update of
the bundle's name only (``resourceNames``); leases get, create, update in the Lease's
namespace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kubernetes.aio.client import ApiClient, CoreV1Api, V1ConfigMap, V1ObjectMeta
from kubernetes.aio.client.exceptions import ApiException
from kubernetes.aio.watch import Watch

from meshca.config import BundleConfigMapConfig
from meshca.kube.client import api_client, lease_namespace
from meshca.kube.lease import API_ERRORS, LeaseElector, LeaseSettings, api_problem

log = logging.getLogger(__name__)

BUNDLE_POLL_SECONDS = 1.0
MANAGED_BY = {"app.kubernetes.io/managed-by": "meshca"}


class BundleConfigMaps:
    """Writes ``bundle()`` (PEM) to the ConfigMap of every namespace; see the module."""

    def __init__(
        self, api: ApiClient, config: BundleConfigMapConfig, bundle: Callable[[], str]
    ) -> None:
        self._core = CoreV1Api(api)
        self._config = config
        self._bundle = bundle
        self._timeout = config.timeout.total_seconds()
        self._lock = asyncio.Lock()
        self._last_problem: str | None = None
        self.writes = 0

    async def run(self) -> None:
        """Until cancelled: the Lease holder's work."""
        published = self._bundle()
        watcher = asyncio.create_task(self._namespaces(), name="meshca-bundle-watch")
        try:
            while True:
                await asyncio.sleep(BUNDLE_POLL_SECONDS)
                if watcher.done():  # it only ends by failing; say why and go on
                    self._problem(f"the namespace watch stopped: {watcher.exception()!r}")
                    watcher = asyncio.create_task(self._namespaces())
                current = self._bundle()
                if current != published and await self.sync_all(current):
                    log.info(
                        "trust bundle changed: ConfigMap %s rewritten in every namespace",
                        self._config.name,
                    )
                    published = current
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def sync_all(self, pem: str) -> bool:
        """Write ``pem`` wherever it is not; True when every namespace has it."""
        try:
            namespaces = await self._core.list_namespace(_request_timeout=self._timeout)
        except API_ERRORS as exc:
            self._problem(f"cannot list namespaces: {api_problem(exc)}")
            return False
        names = [ns.metadata.name for ns in namespaces.items if ns.metadata and ns.metadata.name]
        results = [await self.ensure(name, pem) for name in names]
        return all(results)

    async def _namespaces(self) -> None:
        """List and write everywhere, watch for new namespaces until the resync; repeat."""
        resync = self._config.resync_interval.total_seconds()
        while True:
            started = time.monotonic()
            try:
                listed = await self._core.list_namespace(_request_timeout=self._timeout)
            except API_ERRORS as exc:
                self._problem(f"cannot list namespaces: {api_problem(exc)}")
                await asyncio.sleep(min(resync, 5.0))
                continue
            pem = self._bundle()
            for ns in listed.items:
                if ns.metadata and ns.metadata.name:
                    await self.ensure(ns.metadata.name, pem)
            version = listed.metadata.resource_version if listed.metadata else None
            left = max(1, int(resync - (time.monotonic() - started)))
            try:
                await self._watch(version, left)
            except API_ERRORS as exc:
                self._problem(f"the namespace watch failed: {api_problem(exc)}")
                await asyncio.sleep(1.0)

    async def _watch(self, version: str | None, seconds: int) -> None:
        # kubernetes.aio.watch and ApiClient.close carry no type hints.
        watch = Watch()  # type: ignore[no-untyped-call]
        try:
            async for event in watch.stream(  # type: ignore[no-untyped-call]
                self._core.list_namespace,
                resource_version=version,
                timeout_seconds=seconds,
                _request_timeout=seconds + self._timeout,
            ):
                raw = event.get("raw_object") if isinstance(event, dict) else None
                name = (raw or {}).get("metadata", {}).get("name")
                if event.get("type") == "ADDED" and isinstance(name, str):
                    await self.ensure(name)
        finally:
            await watch.close()  # type: ignore[no-untyped-call]

    async def ensure(self, namespace: str, pem: str | None = None) -> bool:
        """The ConfigMap in ``namespace`` holds ``pem`` (default: the current bundle);
        True when it does (or the namespace is going away)."""
        pem = self._bundle() if pem is None else pem
        name, key = self._config.name, self._config.key
        async with self._lock:
            try:
                try:
                    current = await self._core.read_namespaced_config_map(
                        name, namespace, _request_timeout=self._timeout
                    )
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    body = V1ConfigMap(
                        metadata=V1ObjectMeta(name=name, namespace=namespace, labels=MANAGED_BY),
                        data={key: pem},
                    )
                    await self._core.create_namespaced_config_map(
                        namespace, body, _request_timeout=self._timeout
                    )
                    log.info("wrote ConfigMap %s/%s (new)", namespace, name)
                else:
                    if (current.data or {}).get(key) == pem:
                        return True
                    current.data = {**(current.data or {}), key: pem}
                    await self._core.replace_namespaced_config_map(
                        name, namespace, current, _request_timeout=self._timeout
                    )
                    log.info("wrote ConfigMap %s/%s (updated bundle)", namespace, name)
            except ApiException as exc:
                if exc.status == 403 and "being terminated" in str(exc.body or ""):
                    return True  # the namespace is being deleted: nothing to publish there
                self._problem(f"cannot write ConfigMap {namespace}/{name}: {api_problem(exc)}")
                return False
            except API_ERRORS as exc:
                self._problem(f"cannot write ConfigMap {namespace}/{name}: {api_problem(exc)}")
                return False
        self.writes += 1
        self._last_problem = None
        return True

    def _problem(self, message: str) -> None:
        if message != self._last_problem:
            log.warning("bundle ConfigMaps: %s; retrying", message)
        self._last_problem = message


class BundleWriter:
    """The Lease elector and the ConfigMap writer of one CA process, started together.

    ``identity`` names this process in the Lease (``hostname:pid``: in a pod, the host
    name is the pod's name). Raises ConfigError when the API client cannot be set up.
    """

    def __init__(
        self, config: BundleConfigMapConfig, identity: str, bundle: Callable[[], str]
    ) -> None:
        self._api = api_client(config)
        self.configmaps = BundleConfigMaps(self._api, config, bundle)
        self.elector = LeaseElector(
            self._api,
            LeaseSettings(
                namespace=lease_namespace(config),
                name=config.lease_name,
                identity=identity,
                lease_duration=config.lease_duration,
                renew_deadline=config.renew_deadline,
                retry_period=config.retry_period,
                timeout=config.timeout,
            ),
        )
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(
                self.elector.run(self.configmaps.run), name="meshca-bundle-writer"
            )

    async def stop(self) -> None:
        """Stop writing and release the Lease, so another process takes over at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._api.close()  # type: ignore[no-untyped-call]
