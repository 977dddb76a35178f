"""Workload attestation: which SPIFFE ID does the process calling the agent get?

A node agent serves many workloads on one socket; it tells them apart by the calling
process (:class:`~meshca.agent._caller_socket.Caller`, from ``SO_PEERCRED``) and serves
each only its own SVID. Two attestors:

- :class:`KubernetesAttestor` (one agent per node): the process's cgroup names its pod
  UID and container ID (:mod:`meshca.agent.cgroups`); the kubelet's pod list
  (:mod:`meshca.agent.kubelet`) must hold that pod with that container started; the
  identity is ``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``. A
  process in no pod, or in a pod (or container) the kubelet does not list yet, is asked
  about again for up to ``wait``, then refused naming what was missing.
- :class:`UnixAttestor` (several workloads on one VM): rules in the agent's settings map
  the process's uid, primary gid and executable (``/proc/<pid>/exe``) to SPIFFE IDs;
  every condition of a rule must hold; matches naming two different IDs are refused.

Every answer is checked against the process still being the one that connected (its
pidfd): a process that exited is refused, so a recycled pid never gets its identity.
Refusals are :class:`AttestationError` with a stable ``reason`` and a message for the
caller; ``unavailable`` marks those that retrying may fix (the kubelet did not answer).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from meshca.agent._caller_socket import Caller
from meshca.agent.cgroups import CgroupError, read_cgroup
from meshca.errors import MeshcaError, SpiffeIdError
from meshca.kube.podinfo import PodLookupError
from meshca.spiffe import SpiffeId, TrustDomain

if TYPE_CHECKING:  # aiohttp is loaded by node agents only
    from meshca.agent.kubelet import KubeletPods

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


class AttestationError(MeshcaError):
    """The calling process gets no identity from this agent; ``message`` says why."""

    default_reason = "caller_unknown"

    def __init__(self, message: str, *, reason: str | None = None, unavailable: bool = False):
        super().__init__(message, reason=reason)
        self.unavailable = unavailable


class WorkloadAttestor(Protocol):
    async def attest(self, caller: Caller) -> SpiffeId:
        """The caller's SPIFFE ID; raises AttestationError."""
        ...

    def identities_in_use(self) -> frozenset[SpiffeId] | None:
        """Identities some workload still has (the pods on the node), or None when that
        cannot be told (then only open connections keep an identity)."""
        ...


def _who(caller: Caller) -> str:
    return f"process {caller.pid} (uid {caller.uid}, gid {caller.gid})"


def _still_there(caller: Caller) -> None:
    if not caller.alive():
        raise AttestationError(
            f"{_who(caller)} exited, or could not be pinned when it connected; its pid may "
            "belong to another process now",
            reason="caller_exited",
        )


class KubernetesAttestor:
    """Pod identities from cgroups and the kubelet; see the module docstring."""

    def __init__(
        self,
        trust_domain: TrustDomain,
        kubelet: KubeletPods,
        *,
        proc_root: Path,
        wait: timedelta,
    ) -> None:
        self._trust_domain = trust_domain
        self._kubelet = kubelet
        self._proc_root = proc_root
        self._wait = wait.total_seconds()

    def identities_in_use(self) -> frozenset[SpiffeId] | None:
        if not self._kubelet.answered:
            return None
        ids = set()
        for pod in self._kubelet.pods:
            if pod.active:
                try:
                    ids.add(self._trust_domain.workload(pod.namespace, pod.service_account))
                except SpiffeIdError:
                    continue
        return frozenset(ids)

    async def attest(self, caller: Caller) -> SpiffeId:
        if caller.pid <= 0:
            raise AttestationError(
                "the calling process is not visible to the agent (no pid in its peer "
                "credentials): run the agent in the host's PID namespace (hostPID)",
                reason="caller_not_visible",
            )
        deadline = time.monotonic() + self._wait
        while True:
            problem = await self._try(caller)
            if isinstance(problem, SpiffeId):
                return problem
            left = deadline - time.monotonic()
            if left <= 0:
                raise AttestationError(
                    f"{problem}; waited {self._wait:g}s", reason="caller_not_in_a_known_pod"
                )
            await asyncio.sleep(min(POLL_SECONDS, left))

    async def _try(self, caller: Caller) -> SpiffeId | str:
        """The identity, or what is missing (worth waiting for)."""
        try:
            place = await asyncio.to_thread(read_cgroup, self._proc_root, caller.pid)
        except CgroupError as exc:
            _still_there(caller)
            raise AttestationError(f"{_who(caller)}: {exc.message}", reason=exc.reason) from None
        _still_there(caller)
        if place is None:
            return f"{_who(caller)} runs in no Kubernetes pod"
        try:
            pod = await self._kubelet.find(place.pod_uid)
        except PodLookupError as exc:
            raise AttestationError(exc.message, reason=exc.reason, unavailable=True) from None
        if pod is None:
            return f"{_who(caller)} is in pod {place.pod_uid}, which the kubelet does not list"
        if place.container_id not in pod.container_ids:
            return (
                f"{_who(caller)} is in container {place.container_id[:12]}, which the kubelet "
                f"does not list among the containers of {pod.describe()}"
            )
        if not pod.active:
            raise AttestationError(
                f"{_who(caller)} belongs to {pod.describe()}, which is {pod.phase}",
                reason="pod_not_running",
            )
        try:
            return self._trust_domain.workload(pod.namespace, pod.service_account)
        except SpiffeIdError as exc:
            raise AttestationError(
                f"{pod.describe()} has no SPIFFE ID: {exc}", reason="invalid_identity"
            ) from None


@dataclass(frozen=True, slots=True)
class UnixRule:
    """Processes matching every condition given get ``spiffe_id``."""

    spiffe_id: SpiffeId
    uid: int | None = None
    gid: int | None = None
    path: str | None = None

    def matches(self, caller: Caller, exe: str | None) -> bool:
        return (
            (self.uid is None or self.uid == caller.uid)
            and (self.gid is None or self.gid == caller.gid)
            and (self.path is None or self.path == exe)
        )


class UnixAttestor:
    """Identities by uid, gid and executable path; see the module docstring."""

    def __init__(self, rules: Sequence[UnixRule], *, proc_root: Path) -> None:
        if not rules:
            raise ValueError("unix attestation needs at least one rule")
        self._rules = tuple(rules)
        self._proc_root = proc_root
        self._needs_path = any(rule.path is not None for rule in rules)

    def identities_in_use(self) -> frozenset[SpiffeId] | None:
        return None

    async def attest(self, caller: Caller) -> SpiffeId:
        exe: str | None = None
        if self._needs_path and caller.pid > 0:
            exe = await asyncio.to_thread(self._exe, caller.pid)
        _still_there(caller)
        ids = {rule.spiffe_id for rule in self._rules if rule.matches(caller, exe)}
        if len(ids) == 1:
            return ids.pop()
        described = f"{_who(caller)}, executable {exe or 'unknown'}"
        if not ids:
            raise AttestationError(
                f"{described} matches no unix_workloads rule of this agent",
                reason="no_matching_workload",
            )
        raise AttestationError(
            f"{described} matches rules for {', '.join(sorted(map(str, ids)))}; a process "
            "must match exactly one identity",
            reason="ambiguous_workload",
        )

    def _exe(self, pid: int) -> str | None:
        try:
            target = os.readlink(self._proc_root / str(pid) / "exe")
        except OSError:
            return None
        # An executable replaced or deleted since it was started matches no rule.
        return None if target.endswith(" (deleted)") else target
