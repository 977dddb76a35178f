"""This node's pods, as its kubelet lists them: ``GET /pods`` on the authenticated port.

A node agent maps a calling process to its pod by the pod UID in the process's cgroup
(:mod:`meshca.agent.cgroups`), then to a namespace and service account here. The kubelet
is asked over HTTPS (port 10250), its certificate verified against ``ca_file`` (never
skipped: a kubelet whose serving certificate no CA signs needs ``serverTLSBootstrap`` or
its own certificate as ``ca_file``), with the agent's service-account token as bearer
(RBAC: ``nodes/proxy`` get, or ``nodes/pods`` get where the kubelet's fine-grained
authorization is on). The token file is read for each request: the kubelet rotates it.

The list is kept and asked again when a UID is not in it (a pod just started), at most
once per ``min_refresh``; concurrent misses share one request. :meth:`KubeletPods.refresh`
also runs periodically (the agent drops the identities of pods that are gone).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import aiohttp

from meshca.kube.podinfo import PodInfo, PodLookupError, parse_pod_list

log = logging.getLogger(__name__)

MAX_PODS_BYTES = 64 * 1024 * 1024
"""A node's pod list is a few MiB at most (110 pods); larger answers are refused."""
MAX_TOKEN_BYTES = 64 * 1024


class KubeletPods:
    """The pods of one node; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        ca_file: Path,
        token_file: Path,
        timeout: timedelta,
        min_refresh: timedelta = timedelta(seconds=1),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not url.startswith("https://"):
            raise ValueError("the kubelet is asked over HTTPS only")
        self._url = url.rstrip("/") + "/pods"
        self._ca_file = ca_file
        self._token_file = token_file
        self._timeout = timeout.total_seconds()
        self._min_refresh = min_refresh.total_seconds()
        self._clock = clock
        self._ssl: ssl.SSLContext | None = None
        self._session: aiohttp.ClientSession | None = None
        self._pods: dict[str, PodInfo] = {}
        self._asked_at: float | None = None
        self._inflight: asyncio.Future[dict[str, PodInfo]] | None = None
        self.answered = False
        """Whether the kubelet has ever answered."""
        self.requests = 0

    @property
    def pods(self) -> tuple[PodInfo, ...]:
        """The pods of the last answer."""
        return tuple(self._pods.values())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def find(self, uid: str) -> PodInfo | None:
        """The pod with ``uid``; asks the kubelet again when it is not in the list held
        (at most once per ``min_refresh``). Raises PodLookupError when asking fails."""
        pod = self._pods.get(uid)
        if pod is not None:
            return pod
        if self._asked_at is None or self._clock() - self._asked_at >= self._min_refresh:
            await self.refresh()
        return self._pods.get(uid)

    async def refresh(self) -> tuple[PodInfo, ...]:
        """Ask the kubelet now (sharing a request already in flight)."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
            self._inflight.add_done_callback(self._done)
        self._pods = await asyncio.shield(self._inflight)
        return self.pods

    def _done(self, future: asyncio.Future[dict[str, PodInfo]]) -> None:
        self._inflight = None
        if not future.cancelled():
            future.exception()  # read, so a failure nobody awaits is not reported

    async def _fetch(self) -> dict[str, PodInfo]:
        self.requests += 1
        self._asked_at = self._clock()
        token = await asyncio.to_thread(self._token)
        try:
            context = await self._context()
            if self._session is None:
                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self._timeout)
                )
            async with self._session.get(
                self._url,
                ssl=context,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            ) as response:
                status = response.status
                raw = await response.content.read(MAX_PODS_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
            raise self._unavailable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        if status in (401, 403):
            raise self._unavailable(
                f"HTTP {status}: the kubelet refused the agent's credentials; check its "
                "RBAC (nodes/proxy get, or nodes/pods get)"
            )
        if status != 200:
            raise self._unavailable(f"HTTP {status}")
        if len(raw) > MAX_PODS_BYTES:
            raise self._unavailable(f"the answer is larger than {MAX_PODS_BYTES} bytes")
        try:
            pods = {pod.uid: pod for pod in parse_pod_list(json.loads(raw))}
        except (ValueError, RecursionError) as exc:
            raise self._unavailable(f"the answer is not a pod list: {exc}") from None
        self.answered = True
        return pods

    async def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            try:
                self._ssl = await asyncio.to_thread(
                    ssl.create_default_context, cafile=str(self._ca_file)
                )
            except (OSError, ssl.SSLError) as exc:
                raise self._unavailable(
                    f"cannot load kubelet_ca_file {self._ca_file}: {exc}"
                ) from None
        return self._ssl

    def _token(self) -> str:
        try:
            with self._token_file.open("rb") as handle:
                raw = handle.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise self._unavailable(
                f"cannot read the token file {self._token_file}: {exc.strerror}"
            ) from None
        token = raw.decode("ascii", errors="replace").strip()
        if not token or len(raw) > MAX_TOKEN_BYTES or any(c.isspace() for c in token):
            raise self._unavailable(f"the token file {self._token_file} holds no token")
        return token

    def _unavailable(self, detail: str) -> PodLookupError:
        return PodLookupError(
            f"the kubelet at {self._url} could not list this node's pods ({detail})",
            reason="kubelet_unavailable",
        )
