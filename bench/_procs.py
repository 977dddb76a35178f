"""Child processes for the benchmarks, and what /proc says about them.

Every child is started in a session (and process group) of its own, so stopping it
reaches whatever it started too (meshca workers, a load generator's threads), and a
Ctrl-C in the terminal reaches only the benchmark driver, which then stops the children
itself: SIGTERM to the group, a grace period, then SIGKILL to each member still there.

The readings (resident memory, CPU time, established TCP connections) come from
/proc, so they are Linux-only; elsewhere they read as zero.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MAX_SAMPLES = 200_000
"""Upper bound on memory samples kept (at 0.2 s intervals: about 11 hours)."""


class BenchError(Exception):
    """Something the benchmark needs did not work; the message says what."""


class Children:
    """The processes a benchmark started; :meth:`stop_all` ends every one of them."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        stdout: IO[bytes] | int | None = subprocess.DEVNULL,
        stderr: IO[bytes] | int | None = subprocess.DEVNULL,
        stdin: IO[bytes] | int | None = subprocess.DEVNULL,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise BenchError(f"cannot start {argv[0]}: {exc}") from exc
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
        """SIGTERM the process group, wait up to ``grace`` s, then SIGKILL what is left."""
        group = proc.pid
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        # Members that outlived the leader (e.g. workers of a parent killed hard).
        for pid in group_members(group):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return proc.returncode

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            self.stop(proc, grace=5.0)
        self._procs.clear()


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _all_pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid``."""
    members = []
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(pid)
    return members


def children(root: int) -> list[int]:
    """Every descendant of ``root`` (not ``root`` itself)."""
    return process_tree(root)[1:]


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (e.g. a server and its worker processes)."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(pid)
    tree: list[int] = []
    todo = [root]
    while todo and len(tree) < 10_000:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None else None


def reaped_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``'s children that have ended and been waited for (cutime +
    cstime): what a server's short-lived processes cost after they are gone."""
    fields = _stat_fields(pid)
    return (int(fields[13]) + int(fields[14])) / CLOCK_TICKS if fields is not None else 0.0


def rss_bytes(pids: Sequence[int]) -> int:
    """Sum of VmRSS over ``pids`` (processes that are gone count zero)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of ``pids`` (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def established_connections(port: int) -> int:
    """TCP connections in ESTABLISHED state whose local port is ``port`` (server side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "01" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def _established_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "01" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    return inodes


def connections_by_process(root: int, port: int) -> list[int]:
    """Established connections to ``port`` held by each process of ``root``'s tree.

    Processes holding none are left out; with SO_REUSEPORT workers this shows how the
    kernel spread the client's connections over them.
    """
    wanted = _established_inodes(port)
    counts = []
    for pid in process_tree(root):
        held = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:[") and target[8:-1] in wanted:
                        held += 1
        except OSError:
            continue
        if held:
            counts.append(held)
    return sorted(counts, reverse=True)


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all CPUs, not idle or iowait), in seconds.

    Read at both ends of a window, it shows how much CPU processes other than the
    benchmark's took on a shared machine.
    """
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0.0
    if fields[0] != "cpu":
        return 0.0
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    ticks = [int(v) for v in fields[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class TreeReading:
    at: float
    rss: int
    connections: int


class TreeSampler:
    """Samples a process tree's RSS (and connections to ``port``) on a thread."""

    def __init__(self, root: int, port: int | None, interval: float = 0.2) -> None:
        self._root = root
        self._port = port
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)
        self.readings: list[TreeReading] = []

    def read(self) -> TreeReading:
        pids = process_tree(self._root)
        conns = established_connections(self._port) if self._port is not None else 0
        return TreeReading(time.time(), rss_bytes(pids), conns)

    def cpu(self) -> float:
        return cpu_seconds(process_tree(self._root))

    def start(self) -> TreeReading:
        first = self.read()
        self.readings.append(first)
        self._thread.start()
        return first

    def _run(self) -> None:
        while not self._stop.wait(self._interval) and len(self.readings) < MAX_SAMPLES:
            self.readings.append(self.read())

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def peak_rss(self) -> int:
        return max((r.rss for r in self.readings), default=0)

    def peak_connections(self, start: float, end: float) -> int:
        return max((r.connections for r in self.readings if start <= r.at <= end), default=0)


def read_line(proc: subprocess.Popen[bytes], deadline: float) -> str:
    """One line from ``proc``'s stdout, waiting no later than ``deadline`` (time.monotonic)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"process {proc.pid} said nothing in time (got {data!r})")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 1)
        if not chunk:
            raise BenchError(f"process {proc.pid} exited (status {proc.poll()}) before a line")
        data += chunk
        if len(data) > 1 << 16:
            raise BenchError(f"process {proc.pid} wrote an over-long line")
    return data.decode(errors="replace").rstrip("\n")


def wait_for_text(
    path: Path, proc: subprocess.Popen[bytes], predicate: str, timeout: float
) -> str | None:
    """Poll ``path`` until a line contains ``predicate``; None if ``proc`` exits first.

    Raises BenchError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if predicate in line:
                    return line
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    raise BenchError(f"no line with {predicate!r} in {path} within {timeout:.0f}s")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False
