"""The pods of a node and a pod by name, as the API server lists them, briefly cached.

The CA asks two things when a node agent requests another workload's identity (see
:mod:`meshca.ca.node_authz`): the agent's own pod (``GET
/api/v1/namespaces/<ns>/pods/<name>``: its node, and whether it is still the pod the
token was bound to), and the pods scheduled on that node (``GET
/api/v1/pods?fieldSelector=spec.nodeName=<node>``).

Caching rules, so that the cache never vouches for a pod the API server has said is gone:

- An answer is used for ``ttl`` from the moment its request was *sent*; after that the
  next question asks again. A pod deleted at time t is refused from at most t + ttl on.
- A question the cached list cannot answer (no such pod on the node) asks the API
  server again at once, at most once per ``min_refresh`` per node, so a pod just
  scheduled is found without waiting for the TTL and a flood of misses costs one call.
- Concurrent questions about one node share one request. An answer never replaces one
  whose request was sent later.
- A failed request is never answered from an expired entry: the caller is told the API
  server could not be asked (:class:`PodLookupError`), and may retry.

RBAC it needs: pods get, list (cluster-wide).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import aiohttp
from kubernetes.aio.client import ApiClient, CoreV1Api
from kubernetes.aio.client.exceptions import ApiException

from meshca.kube.podinfo import PodInfo, PodLookupError, parse_pod, parse_pod_list

log = logging.getLogger(__name__)

MAX_ENTRIES = 20_000
"""Nodes (and pods by name) remembered at once; expired entries go first."""

Clock = Callable[[], float]
_K = TypeVar("_K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class _Answer:
    asked_at: float
    pods: tuple[PodInfo, ...]


class PodDirectory:
    """Pods by node and by name from one API server; see the module docstring."""

    def __init__(
        self,
        api: ApiClient,
        *,
        ttl: timedelta,
        min_refresh: timedelta,
        timeout: timedelta,
        clock: Clock = time.monotonic,
    ) -> None:
        self._api = api
        self._core = CoreV1Api(api)
        self._ttl = ttl.total_seconds()
        self._min_refresh = min_refresh.total_seconds()
        self._timeout = timeout.total_seconds()
        self._clock = clock
        self._nodes: dict[str, _Answer] = {}
        self._named: dict[tuple[str, str], _Answer] = {}
        self._inflight: dict[Hashable, asyncio.Future[_Answer]] = {}
        self.api_calls = 0

    async def close(self) -> None:
        await self._api.close()  # type: ignore[no-untyped-call]

    async def pod(self, namespace: str, name: str) -> PodInfo | None:
        """The pod ``namespace/name``, or None when the API server says there is none."""
        key = (namespace, name)
        answer = self._named.get(key)
        if answer is None or not self._fresh(answer):
            answer = await self._shared(("pod", key), lambda: self._get_pod(namespace, name))
            self._remember(self._named, key, answer)
        return answer.pods[0] if answer.pods else None

    async def find_on_node(self, node: str, wanted: Callable[[PodInfo], bool]) -> PodInfo | None:
        """A pod scheduled on ``node`` for which ``wanted`` is true, or None."""
        answer = self._nodes.get(node)
        if answer is None or not self._fresh(answer):
            answer = await self._node(node)
        found = next((pod for pod in answer.pods if wanted(pod)), None)
        if found is None and self._clock() - answer.asked_at >= self._min_refresh:
            answer = await self._node(node)
            found = next((pod for pod in answer.pods if wanted(pod)), None)
        return found

    # -- internals ----------------------------------------------------------------------

    def _fresh(self, answer: _Answer) -> bool:
        return self._clock() - answer.asked_at < self._ttl

    async def _node(self, node: str) -> _Answer:
        answer = await self._shared(("node", node), lambda: self._list_node(node))
        self._remember(self._nodes, node, answer)
        return self._nodes[node]

    def _remember(self, table: dict[_K, _Answer], key: _K, answer: _Answer) -> None:
        held = table.get(key)
        if held is not None and held.asked_at > answer.asked_at:
            return  # a later request has answered already
        if key not in table and len(table) >= MAX_ENTRIES:
            self._evict(table)
        table[key] = answer

    def _evict(self, table: dict[_K, _Answer]) -> None:
        expired = [k for k, a in table.items() if not self._fresh(a)]
        for key in expired or list(table)[: len(table) // 2]:
            del table[key]

    async def _shared(self, key: Hashable, ask: Callable[[], Awaitable[_Answer]]) -> _Answer:
        """One request per key at a time; the others wait for its answer."""
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(ask())
            self._inflight[key] = pending

            def done(future: asyncio.Future[_Answer]) -> None:
                self._inflight.pop(key, None)
                if not future.cancelled():
                    future.exception()  # read: every waiter may have given up

            pending.add_done_callback(done)
        return await asyncio.shield(pending)

    async def _get_pod(self, namespace: str, name: str) -> _Answer:
        asked_at = self._clock()
        document = await self._call(
            f"pod {namespace}/{name}",
            lambda: self._core.read_namespaced_pod_without_preload_content(
                name, namespace, _request_timeout=self._timeout
            ),
            missing_ok=True,
        )
        if document is None:
            return _Answer(asked_at, ())
        pod = parse_pod(document)
        if pod is None or (pod.namespace, pod.name) != (namespace, name):
            raise PodLookupError(
                f"the API server's answer for pod {namespace}/{name} is not that pod"
            )
        return _Answer(asked_at, (pod,))

    async def _list_node(self, node: str) -> _Answer:
        asked_at = self._clock()
        document = await self._call(
            f"the pods of node {node}",
            lambda: self._core.list_pod_for_all_namespaces_without_preload_content(
                field_selector=f"spec.nodeName={node}", _request_timeout=self._timeout
            ),
        )
        try:
            pods = tuple(p for p in parse_pod_list(document) if p.node_name == node)
        except ValueError as exc:
            raise PodLookupError(f"listing the pods of node {node}: {exc}") from None
        return _Answer(asked_at, pods)

    async def _call(
        self,
        what: str,
        request: Callable[[], Awaitable[aiohttp.ClientResponse]],
        *,
        missing_ok: bool = False,
    ) -> object:
        self.api_calls += 1
        try:
            async with asyncio.timeout(self._timeout):
                response = await request()
                try:
                    status = response.status
                    raw = await response.read()
                finally:
                    response.release()
        except (ApiException, aiohttp.ClientError, TimeoutError) as exc:
            raise PodLookupError(
                f"cannot read {what} from the Kubernetes API: {type(exc).__name__}: {exc}".rstrip(
                    ": "
                )
            ) from None
        if status == 404 and missing_ok:
            return None
        if status != 200:
            hint = " (check meshca's RBAC: pods get, list)" if status in (401, 403) else ""
            raise PodLookupError(f"cannot read {what}: the API server answered HTTP {status}{hint}")
        try:
            document: object = json.loads(raw)
        except (ValueError, RecursionError):
            raise PodLookupError(f"the API server's answer for {what} is not JSON") from None
        return document
