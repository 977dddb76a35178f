"""How many ledger appends per second one PostgreSQL sustains, with 1, 2, 4 and 8 writer
processes appending to one hash-chained ledger at once.

    .venv/bin/python bench/ledger.py [--writers 1,2,4,8] [--batch 1,8] [--duration 10s]
        [--postgres-url postgresql://postgres@127.0.0.1:5432/test] [--json]

Each writer is a process of its own, as CA replicas (or a replica's worker processes)
are, appending with the CA's own code: ``Store.ledger_appender()`` (one held connection,
``SELECT ... FOR UPDATE`` of the ledger head, the rows, the head moved, COMMIT), in a
closed loop of ``--batch`` rows per transaction (a CA process commits the rows that queued
during its previous commit in one transaction: 1 under light load, more under heavy
load). Rows look like real ones (a 700-byte certificate PEM, a SPIFFE ID, evidence).

For each combination: rows/s and commits/s over the window, commit latency percentiles,
the writers' CPU per row and the PostgreSQL server's CPU per row (the whole server,
WAL writer included; other databases' work on the same server too). Every combination
runs on a new database of its own (created on the server, dropped after); at the end its
ledger is verified (one unbroken chain, whatever the interleaving).

The report goes to stdout; with ``--json`` the report goes to stderr and one JSON object
to stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent

from _args import duration  # noqa: E402
from _databases import DEFAULT_POSTGRES_URL, PostgresDatabases, sqlalchemy_url  # noqa: E402
from _procs import loadavg, machine_busy_seconds  # noqa: E402
from _report import machine_facts, percentile  # noqa: E402

from meshca.errors import StoreError  # noqa: E402
from meshca.store import NewIssuance, Store  # noqa: E402

PEM = "-----BEGIN CERTIFICATE-----\n" + ("A" * 64 + "\n") * 10 + "-----END CERTIFICATE-----\n"


def _entry(writer: int, n: int, now: datetime) -> NewIssuance:
    return NewIssuance(
        serial_hex=f"{writer:04x}{n:028x}",
        spiffe_id=f"spiffe://cluster.local/ns/bench-{n % 97}/sa/svc-{n % 13}",
        auth_method="k8s-jwt",
        evidence=f"k8s:cluster:bench,k8s:ns:bench-{n % 97},k8s:sa:svc-{n % 13}",
        peer_address=f"10.0.{writer}.{n % 250}:{40000 + n % 20000}",
        not_before=now - timedelta(minutes=5),
        not_after=now + timedelta(hours=1),
        intermediate_fingerprint=f"{writer:02x}" * 32,
        certificate_pem=PEM,
        issued_at=now,
    )


@dataclass
class WriterResult:
    rows: int
    commits: int
    latencies: list[float]
    cpu_seconds: float
    errors: list[str]


def _writer(url: str, writer: int, batch: int, start: float, stop: float, out: Connection) -> None:
    store = Store(url)
    appender = store.ledger_appender()
    rows = commits = 0
    latencies: list[float] = []
    errors: list[str] = []
    now = datetime.now(UTC)
    appender.append([_entry(writer, 0, now)])  # connect before the window
    time.sleep(max(0.0, start - time.time()))
    cpu0 = time.process_time()
    n = 1
    while time.time() < stop:
        entries = [_entry(writer, n + i, now) for i in range(batch)]
        n += batch
        began = time.perf_counter()
        try:
            appender.append(entries)
        except StoreError as exc:  # reported with the figures
            errors.append(str(exc)[:200])
            if len(errors) > 20:
                break
            continue
        latencies.append(time.perf_counter() - began)
        rows += batch
        commits += 1
    cpu = time.process_time() - cpu0
    store.close()
    out.send(asdict(WriterResult(rows, commits, latencies, cpu, errors)))
    out.close()


@dataclass
class Combination:
    writers: int
    batch: int
    seconds: float
    rows: int
    commits: int
    rows_per_s: float
    commits_per_s: float
    commit_ms_p50: float
    commit_ms_p99: float
    commit_ms_max: float
    writer_cpu_us_per_row: float
    postgres_cpu_us_per_row: float | None
    other_cpu_cores: float
    ledger_ok: bool
    errors: list[str]


def measure(postgres: PostgresDatabases, writers: int, batch: int, seconds: float) -> Combination:
    url = sqlalchemy_url(postgres.create("meshca_ledger_bench"))
    Store.open(url).close()  # migrate once, before the writers
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 3.0  # the writers import and connect first
    stop = start + seconds
    pipes, procs = [], []
    for w in range(writers):
        ours, theirs = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_writer, args=(url, w, batch, start, stop, theirs))
        proc.start()
        pipes.append(ours)
        procs.append(proc)
    time.sleep(max(0.0, start - time.time()))
    pg0, busy0 = postgres.server_cpu(), machine_busy_seconds()
    time.sleep(max(0.0, stop - time.time()))
    pg1, busy1 = postgres.server_cpu(), machine_busy_seconds()
    results = [WriterResult(**pipe.recv()) for pipe in pipes]
    for proc in procs:
        proc.join(30)
    store = Store(url)
    try:
        ledger_ok = store.verify_ledger().ok
    finally:
        store.close()
    rows = sum(r.rows for r in results)
    commits = sum(r.commits for r in results)
    lat = sorted(x for r in results for x in r.latencies)
    writer_cpu = sum(r.cpu_seconds for r in results)
    pg_cpu = (pg1 - pg0) if pg0 is not None and pg1 is not None else None
    ours = writer_cpu + (pg_cpu or 0.0)
    return Combination(
        writers=writers,
        batch=batch,
        seconds=seconds,
        rows=rows,
        commits=commits,
        rows_per_s=rows / seconds,
        commits_per_s=commits / seconds,
        commit_ms_p50=percentile(lat, 50) * 1000 if lat else 0.0,
        commit_ms_p99=percentile(lat, 99) * 1000 if lat else 0.0,
        commit_ms_max=lat[-1] * 1000 if lat else 0.0,
        writer_cpu_us_per_row=writer_cpu * 1e6 / rows if rows else 0.0,
        postgres_cpu_us_per_row=pg_cpu * 1e6 / rows if rows and pg_cpu is not None else None,
        other_cpu_cores=max(0.0, (busy1 - busy0) - ours) / seconds,
        ledger_ok=ledger_ok,
        errors=[e for r in results for e in r.errors][:5],
    )


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "ledger appends on one PostgreSQL: writer processes x rows per commit",
        f"command : {report['command']}",
        f"date    : {report['date']}",
        f"machine : {m['nproc']} CPUs, {m['cpu_model']}, {m['kernel']}; load average "
        f"{m['loadavg_before']} before, {m['loadavg_after']} after",
        f"postgres: {report['postgres']}",
        f"meshca  : commit {m['meshca_commit']}",
        "",
        f"{'writers':>7} {'rows/commit':>11} {'rows/s':>8} {'commits/s':>9} "
        f"{'commit p50/p99/max ms':>22} {'writer CPU us/row':>17} {'PG CPU us/row':>13} "
        f"{'other CPU':>9} {'chain':>6}",
    ]
    for c in report["combinations"]:
        pg = "-" if c["postgres_cpu_us_per_row"] is None else f"{c['postgres_cpu_us_per_row']:.0f}"
        lines.append(
            f"{c['writers']:>7} {c['batch']:>11} {c['rows_per_s']:>8.0f} "
            f"{c['commits_per_s']:>9.0f} "
            f"{c['commit_ms_p50']:>8.1f}/{c['commit_ms_p99']:.1f}/{c['commit_ms_max']:.1f} "
            f"{c['writer_cpu_us_per_row']:>17.0f} {pg:>13} {c['other_cpu_cores']:>9.2f} "
            f"{'ok' if c['ledger_ok'] else 'BROKEN':>6}"
        )
        for error in c["errors"]:
            lines.append(f"        error: {error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/ledger.py", description=__doc__.split("\n")[0])
    parser.add_argument("--writers", default="1,2,4,8", help="writer processes (1,2,4,8)")
    parser.add_argument("--batch", default="1,8", help="rows per commit (1,8)")
    parser.add_argument("--duration", type=duration, default=10.0, help="window (10s)")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("MESHCA_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help=f"a server where the run may create and drop databases [{DEFAULT_POSTGRES_URL}]",
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout, report on stderr")
    args = parser.parse_args(argv)
    writers = [int(w) for w in args.writers.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    if not all(1 <= w <= 64 for w in writers) or not all(1 <= b <= 256 for b in batches):
        parser.error("--writers must be in 1..64 and --batch in 1..256")
    postgres, settings = PostgresDatabases.reach(args.postgres_url)
    if postgres is None:
        print(f"bench/ledger.py: {settings}", file=sys.stderr)
        return 1
    facts = machine_facts(PROJECT_ROOT, None)
    facts["loadavg_before"] = loadavg()
    combinations = []
    try:
        for batch in batches:
            for count in writers:
                c = measure(postgres, count, batch, args.duration)
                print(
                    f"[bench] {count} writer(s) x {batch} row(s)/commit: {c.rows_per_s:.0f} rows/s",
                    file=sys.stderr,
                    flush=True,
                )
                combinations.append(asdict(c))
                postgres.drop_all()
    finally:
        postgres.drop_all()
    facts["loadavg_after"] = loadavg()
    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": facts,
        "postgres": f"{postgres.admin.host}:{postgres.admin.port or 5432} ({settings})",
        "combinations": combinations,
        "median_rows_per_s": statistics.median(c["rows_per_s"] for c in combinations),
    }
    text = render(report)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(report), flush=True)
    else:
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
