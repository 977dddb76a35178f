"""``meshca demo`` (what ``make run`` runs), as a user runs it: to the end, with --keep,
and interrupted by Ctrl-C. Each run gets its own TMPDIR and HOME, so "no file outside
its temporary directory" and "no process left" are checked, not assumed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.softhsm import unavailable_reason

pytestmark = pytest.mark.e2e

RUN_TIMEOUT = 110.0
"""The demo takes under a minute; this bounds a hung run on a loaded machine."""


def _environment(tmp_path: Path, *, without_softhsm: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHCA_", "XDG_"))}
    for name in ("tmp", "home"):
        (tmp_path / name).mkdir()
    env.update(TMPDIR=str(tmp_path / "tmp"), HOME=str(tmp_path / "home"))
    if without_softhsm:  # softhsm2-util is found on PATH; the CLI itself runs by path
        env["PATH"] = "/nonexistent"
    return env


def _start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "meshca", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def _lines_until(process: subprocess.Popen[str], pattern: str, seen: list[str]) -> str:
    """Read the demo's output until a line matches ``pattern`` (bounded)."""
    assert process.stdout is not None
    deadline = time.monotonic() + RUN_TIMEOUT
    for line in process.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return line
        assert time.monotonic() < deadline, f"no {pattern!r} in time:\n{''.join(seen)}"
    raise AssertionError(f"the demo ended without {pattern!r}:\n{''.join(seen)}")


def _processes_of(directory: Path) -> list[str]:
    """Processes whose command line or environment names ``directory`` (the demo's
    children name it in --config; a CA's workers have it in TMPDIR)."""
    needle = str(directory).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in cmdline or needle in environ:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {command}")
    return found


def _only_the_demo_directory(tmp_path: Path, output: str) -> Path:
    match = re.search(r"files: (\S+)", output)
    assert match is not None, output
    directory = Path(match.group(1))
    assert directory.parent == tmp_path / "tmp"
    assert list((tmp_path / "tmp").iterdir()) == [directory]
    assert list((tmp_path / "home").iterdir()) == []
    return directory


@pytest.fixture
def stopped() -> Iterator[list[subprocess.Popen[str]]]:
    """Demo processes a test started: killed if the test left one running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_the_demo_shows_the_mesh_working_and_ends_by_itself(
    tmp_path: Path, stopped: list[subprocess.Popen[str]]
) -> None:
    if (reason := unavailable_reason()) is not None:
        pytest.skip(f"the demo's root key goes in SoftHSM2 when installed: {reason}")
    process = _start(_environment(tmp_path))
    stopped.append(process)
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"the demo did not end within {RUN_TIMEOUT:g}s:\n{output}") from None
    assert process.returncode == 0, output
    for step in range(1, 9):
        assert f"[{step}/8]" in output
    assert "Root key in SoftHSM2" in output
    assert re.search(r"backend: spiffe://cluster.local/ns/demo/sa/backend, first SVID", output)
    assert "-> 200 hello from backend" in output
    assert re.search(r"peer spiffe://cluster.local/ns/demo/sa/frontend, decision allow", output)
    assert re.search(r"peer spiffe://cluster.local/vm/intruder, decision deny", output)
    assert "its join token, used again: UNAUTHENTICATED: join token" in output
    assert "every agent renewed: its SVID now chains to root" in output
    assert "every agent's trust bundle now holds the new root only" in output
    assert re.search(r"frontend -> backend: \d+ requests over mTLS, 0 failed", output)
    assert "1 by join-token" in output and "ledger OK" in output
    directory = _only_the_demo_directory(tmp_path, output)
    assert _processes_of(directory) == []
    assert (directory / "backend" / "access.log").stat().st_size > 0


def test_keep_leaves_it_running_until_ctrl_c(
    tmp_path: Path, stopped: list[subprocess.Popen[str]]
) -> None:
    process = _start(_environment(tmp_path, without_softhsm=True), "--keep")
    stopped.append(process)
    seen: list[str] = []
    _lines_until(process, r"Still running", seen)
    line = _lines_until(process, r"curl http://127\.0\.0\.1:\d+/ .*frontend -> backend", seen)
    url = line.split()[1]
    with urllib.request.urlopen(url, timeout=10) as response:  # the frontend's proxy, on loopback
        assert response.status == 200
        assert response.read().startswith(b"hello from backend")
    output = "".join(seen)
    assert "Root key in a file (SoftHSM2 is not installed" in output
    directory = _only_the_demo_directory(tmp_path, output)
    assert _processes_of(directory)  # the CA and the agents run on

    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=30)
    assert process.returncode == 0, rest
    assert "SIGINT: stopping every process the demo started" in rest
    assert _processes_of(directory) == []
    _only_the_demo_directory(tmp_path, output)


def test_ctrl_c_while_agents_start_stops_every_process(
    tmp_path: Path, stopped: list[subprocess.Popen[str]]
) -> None:
    process = _start(_environment(tmp_path, without_softhsm=True))
    stopped.append(process)
    seen: list[str] = []
    _lines_until(process, r"agent --config .*/backend/agent\.yaml", seen)
    directory = _only_the_demo_directory(tmp_path, "".join(seen))
    assert _processes_of(directory)  # the CA, and the backend's agent starting

    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGINT, rest
    assert "SIGINT: stopping every process the demo started" in rest
    assert _processes_of(directory) == []
    _only_the_demo_directory(tmp_path, "".join(seen))
