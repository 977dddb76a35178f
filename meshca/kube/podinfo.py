"""What meshca reads of a Kubernetes pod, from its v1 JSON (the API server's or the
kubelet's ``/pods``).

Only the fields that decide an identity are kept: namespace, name, UID, service account,
node and phase. Parsing is strict: an object without a namespace, name, UID or service
account is not a pod meshca can vouch for and is left out (``parse_pod`` returns None),
never filled in with a default. Nothing here imports the Kubernetes client, so the agent
can use it without loading it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from meshca.errors import MeshcaError

ACTIVE_PHASES = frozenset({"Pending", "Running"})
"""Pods whose containers may run (or are starting: native sidecars and init containers
run while the phase is still Pending). ``Succeeded``, ``Failed`` and ``Unknown`` pods
get no certificate."""

_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")
"""A pod UID: a UUID, or (static pods) the 32 hex digits of a hash."""


class PodLookupError(MeshcaError):
    """The Kubernetes API (or the kubelet) could not be asked about pods, or gave an
    answer that is not one."""

    default_reason = "pod_lookup_unavailable"


@dataclass(frozen=True, slots=True)
class PodInfo:
    """A pod as far as identities go."""

    namespace: str
    name: str
    uid: str
    service_account: str
    node_name: str | None
    phase: str
    deleting: bool = False
    """``metadata.deletionTimestamp`` is set: the pod is shutting down, its containers
    may still run for their grace period."""
    container_ids: frozenset[str] = frozenset()
    """The runtime's IDs of the pod's containers that have started (init, regular and
    ephemeral), without the ``containerd://`` scheme."""

    @property
    def active(self) -> bool:
        """Scheduled on a node and not finished (see :data:`ACTIVE_PHASES`)."""
        return bool(self.node_name) and self.phase in ACTIVE_PHASES

    def describe(self) -> str:
        return f"pod {self.namespace}/{self.name} (uid {self.uid})"


def is_pod_uid(text: str) -> bool:
    return _UID.fullmatch(text) is not None


def _text(obj: object, *path: str) -> str | None:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj if isinstance(obj, str) and obj else None


def _container_ids(status: object) -> frozenset[str]:
    ids: set[str] = set()
    if not isinstance(status, dict):
        return frozenset()
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        entries = status.get(key)
        for entry in entries if isinstance(entries, list) else ():
            text = _text(entry, "containerID")
            if text is not None and "://" in text:
                ids.add(text.split("://", 1)[1])
    return frozenset(ids)


def parse_pod(obj: object) -> PodInfo | None:
    """The :class:`PodInfo` of one v1 Pod object; None if it lacks what an identity needs."""
    namespace = _text(obj, "metadata", "namespace")
    name = _text(obj, "metadata", "name")
    uid = _text(obj, "metadata", "uid")
    # An empty serviceAccountName means "default" to the API server, which fills it in
    # on admission; a pod object without it did not come from an API server.
    account = _text(obj, "spec", "serviceAccountName")
    if namespace is None or name is None or uid is None or account is None:
        return None
    return PodInfo(
        namespace=namespace,
        name=name,
        uid=uid,
        service_account=account,
        node_name=_text(obj, "spec", "nodeName"),
        phase=_text(obj, "status", "phase") or "Unknown",
        deleting=_text(obj, "metadata", "deletionTimestamp") is not None,
        container_ids=_container_ids(obj.get("status") if isinstance(obj, dict) else None),
    )


def parse_pod_list(document: object) -> Iterator[PodInfo]:
    """The pods of a v1 PodList; ValueError when it is not one."""
    items = document.get("items") if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise ValueError("the answer is not a PodList (no 'items' list)")
    for item in items:
        pod = parse_pod(item)
        if pod is not None:
            yield pod
