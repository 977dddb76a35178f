"""Figures and facts for the benchmark report: percentiles, machine facts, formatting."""

from __future__ import annotations

import array
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def load_latencies(paths: Sequence[Path]) -> list[float]:
    """Latencies (seconds) the load generators wrote, merged and sorted."""
    values = array.array("d")
    for path in paths:
        values.frombytes(path.read_bytes())
    return sorted(values)


@dataclass
class Latency:
    """Milliseconds."""

    p50: float
    p90: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, sorted_seconds: Sequence[float]) -> Latency:
        ms = 1000.0
        mean = sum(sorted_seconds) / len(sorted_seconds) if sorted_seconds else 0.0
        return cls(
            p50=percentile(sorted_seconds, 50) * ms,
            p90=percentile(sorted_seconds, 90) * ms,
            p99=percentile(sorted_seconds, 99) * ms,
            max=(sorted_seconds[-1] if sorted_seconds else 0.0) * ms,
            mean=mean * ms,
        )


@dataclass
class ServerRun:
    """One server's figures over the measurement window."""

    name: str
    endpoint: str
    requests: int
    certs: int
    certs_per_s: float
    latency_ms: Latency
    errors: dict[str, int]
    errors_outside_window: dict[str, int]
    rss_start_mib: float
    rss_peak_mib: float
    server_cpu_cores: float
    client_cpu_cores: list[float]
    other_cpu_cores: float
    """CPU the rest of the machine used during the window (a shared machine's noise)."""
    connections_seen: int
    connections_per_process: list[int]
    sample_check: str
    processes: int
    root_key: str = "-"
    """Where the CA's root key is (meshca: the ``--signer`` backend and issuing keys)."""
    database: str = "-"
    """Where the server records what it issues (meshca's ledger, cfssl's certdb)."""
    database_cpu_cores: float | None = None
    """CPU of the PostgreSQL server during the window (all of it: other users' work on
    the same server included)."""
    kms_calls_window: dict[str, int] | None = None
    """KMS emulator RPCs by method during the window (None: no KMS in this run)."""
    kms_calls_total: dict[str, int] | None = None
    """KMS emulator RPCs from root creation to server stop."""
    notes: list[str] = field(default_factory=list)

    @property
    def cpu_ms_per_cert(self) -> float:
        """Server CPU time per certificate: steadier than certs/s on a shared machine."""
        return self.server_cpu_cores * 1000 / self.certs_per_s if self.certs_per_s else 0.0

    @property
    def database_cpu_ms_per_cert(self) -> float | None:
        if self.database_cpu_cores is None or not self.certs_per_s:
            return None
        return self.database_cpu_cores * 1000 / self.certs_per_s

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "cpu_ms_per_cert": self.cpu_ms_per_cert,
            "database_cpu_ms_per_cert": self.database_cpu_ms_per_cert,
        }


def _first(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _run(argv: Sequence[str], cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(
            list(argv), cwd=cwd, capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def git_commit(root: Path) -> str:
    commit = _run(["git", "rev-parse", "--short=12", "HEAD"], root) or "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], root)
    return f"{commit}{' + uncommitted changes' if dirty else ''}"


def machine_facts(root: Path, cfssl: str | None) -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    mem_kib = _first("/proc/meminfo", "MemTotal").split()[0]
    cfssl_version = ""
    if cfssl:
        lines = _run([cfssl, "version"]).splitlines()
        cfssl_version = ", ".join(line.strip() for line in lines if line.strip())
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": _first("/proc/cpuinfo", "model name"),
        "memory_gib": round(int(mem_kib) / MIB, 1) if mem_kib.isdigit() else None,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "grpcio": _version("grpcio"),
        "aiohttp": _version("aiohttp"),
        "cryptography": _version("cryptography"),
        "pyjwt": _version("PyJWT"),
        "meshca_commit": git_commit(root),
        "cfssl": cfssl_version or None,
    }


def _cell(run: ServerRun | None, what: str) -> str:
    if run is None:
        return "-"
    lat = run.latency_ms
    cells = {
        "endpoint": run.endpoint,
        "requests": f"{run.requests}",
        "certs": f"{run.certs}",
        "certs/s": f"{run.certs_per_s:.1f}",
        "p50": f"{lat.p50:.2f}",
        "p90": f"{lat.p90:.2f}",
        "p99": f"{lat.p99:.2f}",
        "max": f"{lat.max:.2f}",
        "mean": f"{lat.mean:.2f}",
        "errors": ", ".join(f"{k} {v}" for k, v in sorted(run.errors.items())) or "none",
        "rss": f"{run.rss_start_mib:.1f} / {run.rss_peak_mib:.1f}",
        "processes": f"{run.processes}",
        "server cpu": f"{run.server_cpu_cores:.2f}",
        "cpu per cert": f"{run.cpu_ms_per_cert:.2f}" if run.certs else "-",
        "db cpu per cert": (
            "-" if run.database_cpu_ms_per_cert is None else f"{run.database_cpu_ms_per_cert:.2f}"
        ),
        "client cpu": " + ".join(f"{c:.2f}" for c in run.client_cpu_cores) or "-",
        "other cpu": f"{run.other_cpu_cores:.2f}",
        "connections": f"{run.connections_seen}"
        + (
            f" ({'+'.join(map(str, run.connections_per_process))} per process)"
            if len(run.connections_per_process) > 1
            else ""
        ),
        "check": run.sample_check,
        "root": run.root_key,
        "database": run.database,
        "kms window": kms_calls(run.kms_calls_window),
    }
    return cells[what]


def kms_calls(calls: dict[str, int] | None) -> str:
    """``AsymmetricSign`` first (what costs money and latency per call), then the rest."""
    if calls is None:
        return "-"
    others = sorted((m, n) for m, n in calls.items() if m != "AsymmetricSign" and n)
    return ", ".join(
        [f"AsymmetricSign {calls.get('AsymmetricSign', 0)}"] + [f"{m} {n}" for m, n in others]
    )


ROWS = (
    ("endpoint", "endpoint"),
    ("root key", "root"),
    ("records issuance in", "database"),
    ("requests completed in window", "requests"),
    ("certificates issued", "certs"),
    ("certs/s", "certs/s"),
    ("latency p50 (ms)", "p50"),
    ("latency p90 (ms)", "p90"),
    ("latency p99 (ms)", "p99"),
    ("latency max (ms)", "max"),
    ("latency mean (ms)", "mean"),
    ("errors by code", "errors"),
    ("RSS start / peak (MiB)", "rss"),
    ("server processes (incl. helpers)", "processes"),
    ("server CPU (cores busy)", "server cpu"),
    ("server CPU per certificate (ms)", "cpu per cert"),
    ("PostgreSQL server CPU per cert (ms)", "db cpu per cert"),
    ("load-generator CPU (cores)", "client cpu"),
    ("other processes' CPU (cores)", "other cpu"),
    ("TCP connections seen", "connections"),
    ("sampled certificates", "check"),
    ("KMS calls in window", "kms window"),
)


RATIO_NOTES = {
    "grpc floor / cfssl": "no CA served by grpcio in Python exceeds this here",
    "grpc + sign / cfssl": "cfssl's own work, in Python behind grpcio",
}


def render(report: dict[str, Any], runs: Sequence[ServerRun | None]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        "issuance throughput: meshca vs cfssl (with and without its certificate database)",
        f"command   : {report['command']}",
        f"date      : {report['date']}",
        f"machine   : {m['nproc']} CPUs ({m['cpus_usable']} usable), {m['cpu_model']}, "
        f"{m['memory_gib']} GiB, {m['kernel']}; load average {m.get('loadavg_before')} "
        f"before, {m.get('loadavg_after')} after",
        f"software  : {m['python']}, grpcio {m['grpcio']}, aiohttp {m['aiohttp']}, "
        f"cryptography {m['cryptography']}, PyJWT {m['pyjwt']}",
        f"meshca    : commit {m['meshca_commit']}; {s['meshca_workers']}; signer "
        f"{s['signer']}, issuing_key {s['issuing_key']}",
        f"cfssl     : {m['cfssl'] or '-'}",
        f"load      : closed loop, {s['concurrency']} in flight over {s['connections']} "
        f"connections, {s['load_procs']} load-generator process(es), warmup "
        f"{s['warmup_s']:g}s, window {s['duration_s']:g}s, {s['identities']} identities, "
        f"timeout {s['timeout_s']:g}s",
        "",
    ]
    has_kms = any(r is not None and r.kms_calls_total is not None for r in runs)
    rows = [(label, key) for label, key in ROWS if has_kms or not key.startswith("kms")]
    width = max(len(label) for label, _ in rows)
    names = [r.name if r is not None else "-" for r in runs]
    # Each column as wide as its own longest cell (long cells are cut at 40 characters).
    cells = [[_cell(r, k)[:40] for _, k in rows] for r in runs]
    cols = [
        2 + max(12, len(n), *(len(c) for c in column))
        for n, column in zip(names, cells, strict=True)
    ]
    lines.append(
        f"{'':<{width}}  " + "".join(f"{n:<{c}}" for n, c in zip(names, cols, strict=True))
    )
    for i, (label, _) in enumerate(rows):
        lines.append(
            f"{label:<{width}}  "
            + "".join(f"{column[i]:<{c}}" for column, c in zip(cells, cols, strict=True))
        )
    ratios: dict[str, float] = report.get("ratios") or {}
    if ratios:
        lines += ["", "certs/s ratios (same run):"]
        for pair, value in ratios.items():
            why = RATIO_NOTES.get(pair)
            lines.append(f"  {pair:<48} {value:6.3f}" + (f"  ({why})" if why else ""))
    notes = [n for r in runs if r is not None for n in (f"{r.name}: {x}" for x in r.notes)]
    notes += report.get("notes", [])
    if notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in notes]
    if report.get("profile"):
        lines += ["", report["profile"]]
    return "\n".join(lines)
