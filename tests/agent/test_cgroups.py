"""Which pod and container a process runs in, from the cgroup files of
tests/vectors/cgroup (see its README for how each was made)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshca.agent.cgroups import CgroupError, PodContainer, parse_cgroup_file, read_cgroup

VECTORS = Path(__file__).parent.parent / "vectors" / "cgroup"
POD = "6b2f0c4e-8d1a-4f3b-9a5e-2c7d8e9f0a1b"
CONTAINER = "aaaaaaaa1f3e5d7c9b0a2e4d6c8b0a1f3e5d7c9b0a2e4d6c8b0a1f3e5d7c9b0a"
IN_POD = PodContainer(POD, CONTAINER)

EXPECTED: dict[str, PodContainer | str | None] = {
    "v2-systemd-containerd.txt": IN_POD,
    "v2-systemd-crio-guaranteed.txt": IN_POD,
    "v2-cgroupfs.txt": IN_POD,
    "v2-systemd-relative-cgroupns.txt": IN_POD,
    "v2-kind.txt": IN_POD,
    "v1-cgroupfs-docker.txt": IN_POD,
    "v1-systemd-docker.txt": IN_POD,
    "host-process.txt": None,
    "host-process-v1.txt": None,
    "bad-pod-lookalike-in-user-slice.txt": "cgroup_outside_kubepods",
    "bad-pod-cgroup-not-a-container.txt": "not_in_a_container",
    "bad-crio-conmon.txt": "not_in_a_container",
    "bad-two-pods.txt": "cgroup_ambiguous",
    "bad-malformed-pod-uid.txt": "cgroup_unrecognised",
    "bad-not-cgroup-lines.txt": "cgroup_unreadable",
}


def test_every_vector_has_an_expected_outcome() -> None:
    assert sorted(p.name for p in VECTORS.glob("*.txt")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vector(name: str) -> None:
    text = (VECTORS / name).read_text()
    expected = EXPECTED[name]
    if isinstance(expected, str):
        with pytest.raises(CgroupError) as info:
            parse_cgroup_file(text)
        assert info.value.reason == expected
        assert info.value.message
    else:
        assert parse_cgroup_file(text) == expected


def test_read_from_a_proc_root(tmp_path: Path) -> None:
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "cgroup").write_text((VECTORS / "v2-cgroupfs.txt").read_text())
    assert read_cgroup(tmp_path, 4242) == IN_POD
    with pytest.raises(CgroupError) as info:
        read_cgroup(tmp_path, 4343)
    assert info.value.reason == "process_gone"


def test_this_process_is_read_from_the_real_proc() -> None:
    """Whatever this machine's layout, the real file parses without an error."""
    try:
        read_cgroup(Path("/proc"), os.getpid())
    except CgroupError as exc:  # a test run inside a pod would parse; anything else is a bug
        pytest.fail(f"{exc.reason}: {exc.message}")


@given(st.text(max_size=400))
def test_any_text_gives_a_place_none_or_a_cgroup_error(text: str) -> None:
    try:
        result = parse_cgroup_file(text)
    except CgroupError as exc:
        assert exc.reason and exc.message
    else:
        assert result is None or isinstance(result, PodContainer)
