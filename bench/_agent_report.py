"""Figures of bench/agent.py: one rotation's timings, latency summaries, the text report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from _report import percentile


@dataclass
class Rotation:
    """One renewal as the clients saw it; times are Unix times (``time.time()``)."""

    version: int
    serial: str
    leaf_pem: str
    renewed_at: float | None
    """The agent's ``meshca_agent_last_renewal_timestamp_seconds`` for this version
    (None when the scrape did not belong to it)."""
    sds: list[float]
    """Arrival of this version on each SDS stream."""
    wlapi: float | None
    """py-spiffe's X509Source handing this serial to its subscribers (None: not seen)."""
    issued_at: float | None = None
    """The CA ledger's ``issued_at`` of this serial (filled in after the window)."""


@dataclass
class Summary:
    """Milliseconds."""

    n: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Summary:
        values = sorted(seconds)
        return cls(
            n=len(values),
            p50=percentile(values, 50) * 1000,
            p99=percentile(values, 99) * 1000,
            max=(values[-1] if values else 0.0) * 1000,
        )


def latencies(rotations: Sequence[Rotation]) -> dict[str, Summary]:
    """Renewal-to-push summaries, keyed as in the report and the JSON."""
    timed = [r for r in rotations if r.renewed_at is not None and r.sds]
    first, each, last, wlapi, ca = [], [], [], [], []
    for r in timed:
        assert r.renewed_at is not None
        first.append(min(r.sds) - r.renewed_at)
        last.append(max(r.sds) - r.renewed_at)
        each.extend(at - r.renewed_at for at in r.sds)
        if r.wlapi is not None:
            wlapi.append(r.wlapi - r.renewed_at)
        if r.issued_at is not None:
            ca.append(r.renewed_at - r.issued_at)
    return {
        "sds_first_stream": Summary.of(first),
        "sds_each_stream": Summary.of(each),
        "sds_last_stream": Summary.of(last),
        "workload_api": Summary.of(wlapi),
        "ca_issued_to_agent_renewal": Summary.of(ca),
    }


LATENCY_ROWS = (
    ("sds_first_stream", "SDS, first stream to get it"),
    ("sds_each_stream", "SDS, each stream (streams x rotations)"),
    ("sds_last_stream", "SDS, last stream (every stream has it)"),
    ("workload_api", "Workload API, py-spiffe X509Source"),
    ("ca_issued_to_agent_renewal", "context: CA ledger issued_at -> agent renewal"),
)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _quiet(cpu: dict[str, Any]) -> str:
    """The quiet agent's CPU per minute; with no tick seen, the bound one tick gives."""
    if cpu["quiet_s"] is None:
        return "- (--skip-quiet)"
    tick, seconds = cpu["tick_ms"], cpu["quiet_s"]
    if cpu["quiet_cpu_ms"] == 0:
        return f"< {tick * 60 / seconds:.0f} ms (no {tick:.0f} ms clock tick in {seconds:.0f} s)"
    return (
        f"{cpu['quiet_per_minute_ms']:.0f} ms ({cpu['quiet_cpu_ms']:.0f} ms in {seconds:.0f} s, "
        f"{tick:.0f} ms clock ticks)"
    )


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    s = report["settings"]
    mem = report["rss_mib"]
    cpu = report["cpu"]
    lines = [
        "meshca agent benchmark: memory, renewal-to-push latency, CPU per renewal",
        f"command:  {report['command']}",
        f"date:     {report['date']}",
        f"commit:   {m['meshca_commit']}",
        f"machine:  nproc {m['nproc']} ({m['cpus_usable']} usable), {m['cpu_model']}, "
        f"{m['memory_gib']} GiB, {m['kernel']}, {m['python']}, grpcio {m['grpcio']}",
        f"load avg: before {m['loadavg_before']}; after {m['loadavg_after']}",
        f"settings: agent --ttl {s['ttl']} (CA default_ttl {s['ttl']}, max_ttl "
        f"{s['ca_max_ttl']}), renewal at {s['renewal']}; {s['streams']} SDS streams + 1 "
        f"Workload API client; {s['rotations']} rotations asked",
        f"agent:    {report['agent_command']}",
        "",
        "Memory: VmRSS of the agent process (MiB)",
    ]
    mem_rows = [
        (f"quiet agent (--ttl {s['quiet_ttl'] or '-'}, no clients)", mem["quiet"]),
        ("idle: no clients, renewing", mem["idle"]),
        (f"with {s['streams']} SDS streams + 1 Workload API client", mem["with_streams"]),
        ("after the rotations, streams still open", mem["after_rotations"]),
        ("peak (sampled every 0.25 s while the agent ran)", mem["peak"]),
    ]
    if mem.get("floor") is not None:
        mem_rows.append(("floor: grpcio + cryptography doing the least (--floor)", mem["floor"]))
    lines += [f"  {label:<58} {_mib(value):>8}" for label, value in mem_rows]
    lines += [
        "",
        "Renewal to push (ms): from the agent's meshca_agent_last_renewal_timestamp_seconds",
        f"  {'':<50} {'n':>6} {'p50':>8} {'p99':>8} {'max':>8}",
    ]
    for key, label in LATENCY_ROWS:
        row = report["latency_ms"][key]
        lines.append(
            f"  {label:<50} {row['n']:>6} {row['p50']:>8.1f} {row['p99']:>8.1f} {row['max']:>8.1f}"
        )
    lines += [
        f"  rotations observed: {report['rotations_observed']} "
        f"({report['rotations_timed']} matched to the agent's renewal timestamp); "
        f"mean interval {report['renewal_interval_s']:.2f} s"
        if report["renewal_interval_s"] is not None
        else f"  rotations observed: {report['rotations_observed']}",
        "",
        "CPU of the agent (utime+stime)",
        f"  per renewal, {s['streams']} SDS streams + 1 Workload API client:  "
        f"{_ms(cpu['per_renewal_ms'])} ms ({cpu['window_renewals']} renewals, "
        f"{cpu['window_cpu_ms']:.0f} ms in {cpu['window_s']:.1f} s; includes one /metrics "
        f"scrape each, ~{_ms(cpu['metrics_scrape_ms'])} ms)",
        f"  per renewal, no clients:  {_ms(cpu['idle_per_renewal_ms'])} ms "
        f"({cpu['idle_renewals']} renewals, {cpu['idle_cpu_ms']:.0f} ms in "
        f"{cpu['idle_s']:.1f} s)",
        f"  per minute, no clients, renewing every ~{s['renewal_every_s']:.1f} s:  "
        f"{_ms(cpu['idle_per_minute_ms'])} ms",
        f"  per minute, quiet agent (no renewal in the window, no clients):  {_quiet(cpu)}",
        f"  others over the window: bench process (CA + SDS clients) "
        f"{cpu['bench_cores']:.2f} cores, py-spiffe client {cpu['wlapi_cores']:.2f} cores, "
        f"other processes on the machine {cpu['other_cores']:.2f} cores",
    ]
    if report["notes"]:
        lines += ["", "Notes:"] + [f"  - {note}" for note in report["notes"]]
    return "\n".join(lines)
