"""Which pod and container a process runs in, from its ``/proc/<pid>/cgroup``.

The kubelet puts every container of a pod in a cgroup below the pod's, below
``kubepods``; the path names the pod UID and the container ID. The layouts read here:

- cgroup v2, one line ``0::<path>``; cgroup v1, one line per hierarchy
  ``<id>:<controllers>:<path>`` (every line naming a pod must name the same one);
- the cgroupfs driver: ``/kubepods[/burstable|/besteffort]/pod<uid>/<container id>``;
- the systemd driver: ``/kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid
  with _ for ->.slice/<runtime>-<container id>.scope`` (runtime ``cri-containerd``,
  ``crio``, ``docker``); kind's ``kubelet.slice/kubelet-kubepods...`` nesting as well;
- paths relative to the reader's cgroup namespace (``/../../kubepods-...``), as a
  node agent in a private cgroup namespace sees them.

Refused rather than guessed (:class:`CgroupError` with ``reason``): a path whose pod
segment is not below the kubepods hierarchy (a cgroup someone created elsewhere, e.g. in
a delegated user slice, named to look like a pod), a process in no container of the pod
(the pod cgroup itself, a runtime's ``conmon``), lines naming different pods, a UID or
container ID of the wrong shape. The caller (see :mod:`meshca.agent.attestation`) must
still find the container ID among the pod's containers in the kubelet's list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from meshca.errors import MeshcaError

MAX_CGROUP_FILE = 64 * 1024

_QOS = r"(?:burstable|besteffort|guaranteed)"
_HIERARCHY = re.compile(
    rf"kubepods|{_QOS}|kubepods\.slice|kubepods-{_QOS}\.slice"
    rf"|kubelet\.slice|kubelet-kubepods\.slice|kubelet-kubepods-{_QOS}\.slice"
)
"""Segments allowed above a pod's cgroup."""
_POD_CGROUPFS = re.compile(
    r"pod([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32})"
)
_POD_SYSTEMD = re.compile(
    rf"(?:kubelet-)?kubepods(?:-{_QOS})?-pod"
    r"([0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}|[0-9a-f]{32})\.slice"
)
_CONTAINER_CGROUPFS = re.compile(r"([0-9a-f]{64})")
_CONTAINER_SYSTEMD = re.compile(r"(?:cri-containerd|crio|docker)-([0-9a-f]{64})\.scope")


class CgroupError(MeshcaError):
    """A process's cgroups do not place it in one container of one pod."""

    default_reason = "not_in_a_pod"


@dataclass(frozen=True, slots=True)
class PodContainer:
    """Where a process runs: the pod's UID (with dashes) and the runtime's container ID."""

    pod_uid: str
    container_id: str


def _in_pod(path: str) -> PodContainer | None:
    """The pod and container ``path`` names; None for a path outside kubepods."""
    segments = [s for s in path.split("/") if s]
    while segments and segments[0] == "..":
        segments.pop(0)
    for index, segment in enumerate(segments):
        systemd = _POD_SYSTEMD.fullmatch(segment)
        cgroupfs = None if systemd else _POD_CGROUPFS.fullmatch(segment)
        if systemd is None and cgroupfs is None:
            continue
        above = segments[:index]
        if not all(_HIERARCHY.fullmatch(s) for s in above):
            raise CgroupError(
                f"cgroup {path[:200]!r} names a pod outside the kubepods hierarchy",
                reason="cgroup_outside_kubepods",
            )
        match = systemd or cgroupfs
        assert match is not None
        uid = match.group(1).replace("_", "-")
        below = segments[index + 1 :]
        pattern = _CONTAINER_SYSTEMD if systemd else _CONTAINER_CGROUPFS
        found = pattern.fullmatch(below[0]) if len(below) == 1 else None
        if found is None:
            raise CgroupError(
                f"cgroup {path[:200]!r} is in pod {uid} but in none of its containers",
                reason="not_in_a_container",
            )
        return PodContainer(uid, found.group(1))
    if any(_HIERARCHY.fullmatch(s) or "kubepods" in s for s in segments):
        raise CgroupError(
            f"cgroup {path[:200]!r} is below kubepods but names no pod the way the kubelet does",
            reason="cgroup_unrecognised",
        )
    return None


def parse_cgroup_file(text: str) -> PodContainer | None:
    """The pod and container of a ``/proc/<pid>/cgroup`` text; None when the process is
    in no pod (a host process). Raises CgroupError for anything ambiguous."""
    found: PodContainer | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            raise CgroupError(f"unreadable cgroup line {line[:200]!r}", reason="cgroup_unreadable")
        place = _in_pod(parts[2])
        if place is None:
            continue
        if found is not None and place != found:
            raise CgroupError(
                f"the process's cgroups name two places (pod {found.pod_uid} container "
                f"{found.container_id[:12]} and pod {place.pod_uid} container "
                f"{place.container_id[:12]})",
                reason="cgroup_ambiguous",
            )
        found = place
    return found


def read_cgroup(proc_root: Path, pid: int) -> PodContainer | None:
    """:func:`parse_cgroup_file` of ``<proc_root>/<pid>/cgroup``; CgroupError
    (``process_gone``) when it cannot be read."""
    path = proc_root / str(pid) / "cgroup"
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CGROUP_FILE + 1)
    except OSError as exc:
        raise CgroupError(
            f"cannot read {path}: {exc.strerror or exc}", reason="process_gone"
        ) from None
    if len(raw) > MAX_CGROUP_FILE:
        raise CgroupError(
            f"{path} is larger than {MAX_CGROUP_FILE} bytes", reason="cgroup_unreadable"
        )
    return parse_cgroup_file(raw.decode("utf-8", errors="replace"))
