"""Issuance throughput: meshca vs cfssl, on one machine, over loopback.

    .venv/bin/python bench/issue.py [--duration 20s] [--concurrency 32] [--connections 4]
        [--warmup 3s] [--workers N] [--signer file|pkcs11|gcpkms] [--issuing-key memory|hsm]
        [--skip-cfssl] [--json] [--py-spy FILE] ...

1. In a temp dir: an RS256 service-account issuer (key + JWKS file), a meshca config
   with one cluster in local-JWKS mode, and (before any timing) a pool of identities,
   each with a projected service-account token and a P-256 CSR naming its SPIFFE ID.
2. ``meshca server`` as a subprocess (SQLite ledger; gRPC over TLS), its ports read from
   the ready line, its trust bundle from ``/v1/bundle``. The root key is where
   ``--signer`` says (bench/_backends.py): a file (the embedded default), a SoftHSM2
   token of the run's own, or a Cloud KMS emulator in this process; for the last two
   ``meshca admin root create`` makes it first. ``--issuing-key hsm`` (pkcs11 only) keeps
   the issuing intermediates' keys in the token too. Load comes from separate processes
   (bench/_loadgen.py): closed loop, ``--concurrency`` requests in flight over
   ``--connections`` gRPC channels, calling ``IstioCertificateService/CreateCertificate``
   for ``--warmup`` + ``--duration``.
3. ``cfssl serve`` with an ECDSA P-256 root, driven the same way with
   ``POST /api/v1/cfssl/sign {"certificate_request": <the same CSRs>}``, unauthenticated.
4. For each: certificates per second, latency percentiles, errors by code, RSS at the
   start and at peak (the whole process tree), CPU used by server and load generators,
   and a sample of the answers verified against the CA's roots.

The report goes to stdout; with ``--json`` the report goes to stderr and one JSON object
to stdout. Only loopback addresses are used; every child process is stopped on exit,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from _args import duration, positive
from _backends import RootBackend, open_backend
from _checks import intermediate_rows, ledger_rows, uri_sans, verify_cfssl, verify_meshca
from _databases import (
    DEFAULT_POSTGRES_URL,
    PostgresDatabases,
    certdb_config,
    certdb_postgres,
    certdb_sqlite,
    certdb_sqlite_rows,
    libpq_url,
    sqlalchemy_url,
)
from _fixtures import (
    CLUSTER_ID,
    Identity,
    TokenIssuer,
    cfssl_ca,
    localhost_tls,
    make_pool,
    meshca_config,
)
from _procs import (
    BenchError,
    Children,
    TreeSampler,
    connections_by_process,
    free_port,
    loadavg,
    machine_busy_seconds,
    process_tree,
    read_line,
    tail,
    wait_for_port,
    wait_for_text,
)
from _profile import summarise_raw
from _report import MIB, Latency, ServerRun, load_latencies, machine_facts, render
from cryptography import x509
from sqlalchemy.engine import URL

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
LOADGEN = BENCH_DIR / "_loadgen.py"
NULL_CA = BENCH_DIR / "_null_ca.py"
MESHCA = [sys.executable, "-m", "meshca"]
READY = re.compile(
    r"gRPC (?P<mode>TLS|plaintext) on (?P<ghost>[^ ;]+):(?P<grpc>\d+); "
    r".*HTTP on (?P<hhost>[^ ;]+):(?P<http>\d+)"
)
MAX_DURATION = 1800.0
"""Tokens live an hour; a window longer than half of that is refused."""
SAMPLES_PER_PROCESS = 4
PY_SPY_RATE = 200
START_TIMEOUT = 60.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/issue.py",
        description="Issuance throughput: meshca (gRPC, Istio CA API) vs cfssl (HTTP sign).",
    )
    parser.add_argument("--duration", type=duration, default=20.0, help="window (20s)")
    parser.add_argument("--warmup", type=duration, default=3.0, help="load before it (3s)")
    parser.add_argument("--concurrency", type=positive, default=32, help="in flight (32)")
    parser.add_argument("--connections", type=positive, default=4, help="channels/pool (4)")
    parser.add_argument(
        "--workers",
        type=positive,
        default=None,
        help="passed to 'meshca server --workers' when that flag exists",
    )
    parser.add_argument(
        "--load-procs", type=positive, default=1, help="load-generator processes (1)"
    )
    parser.add_argument("--identities", type=positive, default=64, help="identity pool (64)")
    parser.add_argument("--timeout", type=duration, default=10.0, help="per request (10s)")
    parser.add_argument(
        "--signer",
        choices=["file", "pkcs11", "gcpkms"],
        default="file",
        help="meshca's root-key backend: file (default), pkcs11 (a SoftHSM2 token made for "
        "the run), gcpkms (the Cloud KMS emulator of tests/fakes/kms.py)",
    )
    parser.add_argument(
        "--issuing-key",
        choices=["memory", "hsm"],
        default="memory",
        help="where issuing-intermediate keys live: memory (default) or hsm (the SoftHSM2 "
        "token; --signer pkcs11 only; every certificate signed there)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure bench/_null_ca.py, the same gRPC server, TLS, protos and "
        "workers (1) answering a fixed chain with no work at all and (2) doing only "
        "cfssl's work (CSR signature check, build and sign a leaf): ceilings for any CA "
        "served by grpcio in Python on this machine",
    )
    parser.add_argument(
        "--databases",
        default="sqlite,postgres",
        help="where meshca keeps its ledger and cfssl+certdb its certificates, each measured "
        "in turn: sqlite (meshca's embedded default), postgres (a database of the run's own "
        "on --postgres-url) [sqlite,postgres]",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("MESHCA_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="a PostgreSQL server where the run may create and drop databases "
        f"[{DEFAULT_POSTGRES_URL}; MESHCA_BENCH_POSTGRES_URL]",
    )
    parser.add_argument("--skip-certdb", action="store_true", help="cfssl without a database only")
    parser.add_argument("--skip-cfssl", action="store_true", help="measure meshca only")
    parser.add_argument("--skip-meshca", action="store_true", help="measure cfssl only")
    parser.add_argument("--cfssl", default=shutil.which("cfssl"), help="cfssl binary")
    parser.add_argument(
        "--cfssl-tls", action="store_true", help="serve cfssl over TLS (default: plain HTTP)"
    )
    parser.add_argument(
        "--cfssl-connections",
        type=positive,
        default=None,
        help="aiohttp pool size for cfssl (default: --connections); HTTP/1.1 has one "
        "request in flight per connection, gRPC multiplexes",
    )
    parser.add_argument(
        "--rate-limits",
        action="store_true",
        help="keep meshca's default admission rate limits (default: off, since every "
        "request comes from one loopback peer)",
    )
    parser.add_argument(
        "--meshca-log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="meshca's --log-level (info: one line per certificate, as deployed)",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="FILE",
        help="record meshca with py-spy during the window: .svg flamegraph, .json "
        "speedscope, anything else raw collapsed stacks (summarised in the report)",
    )
    parser.add_argument("--py-spy-native", action="store_true", help="py-spy --native")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir, print it")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, report on stderr")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in (0, {MAX_DURATION:g}s]")
    if args.warmup > 300:
        parser.error("--warmup must be at most 300s")
    if args.load_procs > args.concurrency:
        parser.error("--load-procs cannot exceed --concurrency")
    if args.connections > args.concurrency:
        parser.error("--connections cannot exceed --concurrency")
    if args.skip_cfssl and args.skip_meshca:
        parser.error("nothing to measure")
    if args.issuing_key == "hsm" and args.signer != "pkcs11":
        parser.error("--issuing-key hsm needs --signer pkcs11 (the token that holds the root)")
    if args.skip_meshca and (args.signer != "file" or args.issuing_key != "memory"):
        parser.error("--signer and --issuing-key configure meshca; drop --skip-meshca")
    if not args.skip_cfssl and not args.cfssl:
        parser.error("cfssl not found; install golang-cfssl, pass --cfssl, or --skip-cfssl")
    args.databases = [d.strip() for d in args.databases.split(",") if d.strip()]
    unknown = sorted(set(args.databases) - {"sqlite", "postgres"})
    if unknown or not args.databases:
        parser.error(f"--databases takes sqlite and/or postgres, not {','.join(unknown) or '-'}")
    return args


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as possible (each at least 1)."""
    base, extra = divmod(total, parts)
    return [max(1, base + (1 if i < extra else 0)) for i in range(parts)]


@dataclass
class LoadResult:
    ok: int
    requests: int
    errors: dict[str, int]
    errors_outside: dict[str, int]
    latencies: list[float]
    client_cpu: list[float]
    samples: list[dict[str, Any]]
    connections: int
    window: tuple[float, float]
    server_cpu_seconds: float
    machine_busy_seconds: float
    rss_start: int
    rss_peak: int
    processes: int
    connections_seen: int
    connections_per_process: list[int]
    kms_calls: dict[str, int] | None = None
    """KMS emulator RPCs during the window, by method (None: no KMS)."""
    database_cpu_seconds: float | None = None
    """CPU of the whole PostgreSQL server in the window (its other databases too)."""


def _delta(end: dict[str, int] | None, start: dict[str, int] | None) -> dict[str, int] | None:
    if end is None or start is None:
        return None
    return {k: n - start.get(k, 0) for k, n in end.items() if n - start.get(k, 0)}


class Bench:
    """One benchmark run: temp files, children, both servers."""

    def __init__(self, args: argparse.Namespace, tmp: Path, children: Children) -> None:
        self.args = args
        self.tmp = tmp
        self.children = children
        self.pool: list[Identity] = []
        self.notes: list[str] = []
        self.profile_summary: str | None = None
        self.backend: RootBackend | None = None
        self.postgres: PostgresDatabases | None = None

    # -- load ----------------------------------------------------------------------

    def drive(
        self,
        name: str,
        server: subprocess.Popen[bytes],
        port: int,
        spec: dict[str, Any],
        profile: Path | None = None,
        connections: int | None = None,
        counters: Callable[[], dict[str, int] | None] | None = None,
        database_cpu: Callable[[], float | None] | None = None,
    ) -> LoadResult:
        """Run the load generators against ``server`` and gather their figures.

        ``counters`` reads call counters (the KMS emulator's) at the window's two ends;
        ``database_cpu`` the CPU seconds so far of the PostgreSQL server.
        """
        args = self.args
        counters = counters or (lambda: None)
        procs, results, latencies = [], [], []
        concurrency = split(args.concurrency, args.load_procs)
        per_proc = split(connections or args.connections, args.load_procs)
        pool = [i.as_json() for i in self.pool]
        for n in range(args.load_procs):
            result, lat = self.tmp / f"{name}-{n}.result.json", self.tmp / f"{name}-{n}.lat"
            spec_path = self.tmp / f"{name}-{n}.spec.json"
            spec_path.write_text(
                json.dumps(
                    {
                        **spec,
                        "project_root": str(PROJECT_ROOT),
                        "pool": pool,
                        "pool_offset": n * 7919,
                        "concurrency": concurrency[n],
                        "connections": per_proc[n],
                        "warmup": args.warmup,
                        "duration": args.duration,
                        "timeout": args.timeout,
                        "samples": SAMPLES_PER_PROCESS,
                        "result_path": str(result),
                        "latency_path": str(lat),
                    }
                )
            )
            with (self.tmp / f"{name}-{n}.loadgen.err").open("wb") as err:
                procs.append(
                    self.children.start(
                        [sys.executable, str(LOADGEN), str(spec_path)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=err,
                    )
                )
            results.append(result)
            latencies.append(lat)
        deadline = time.monotonic() + START_TIMEOUT
        for n, proc in enumerate(procs):
            try:
                line = read_line(proc, deadline)
            except BenchError as exc:
                raise BenchError(
                    f"load generator {n} did not start: {exc}\n"
                    + tail(self.tmp / f"{name}-{n}.loadgen.err")
                ) from exc
            if not line.startswith("READY"):
                raise BenchError(f"load generator {n} said {line!r}")
        say(f"{name}: load generators ready; warmup {args.warmup:g}s, window {args.duration:g}s")

        sampler = TreeSampler(server.pid, port)
        first = sampler.start()
        start = time.time() + 0.2
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"GO {start!r}\n".encode())
            proc.stdin.close()
        window = (start + args.warmup, start + args.warmup + args.duration)
        spy = None
        try:
            time.sleep(max(0.0, window[0] - time.time()))
            cpu_start = sampler.cpu()
            busy_start = machine_busy_seconds()
            calls_start = counters()
            db_start = database_cpu() if database_cpu else None
            if profile is not None:
                spy = self._start_py_spy(server.pid, profile)
            time.sleep(max(0.0, (window[0] + window[1]) / 2 - time.time()))
            spread = connections_by_process(server.pid, port)
            time.sleep(max(0.0, window[1] - time.time()))
            cpu_end = sampler.cpu()
            busy_end = machine_busy_seconds()
            calls_end = counters()
            db_end = database_cpu() if database_cpu else None
            processes = len(process_tree(server.pid))
            bound = time.monotonic() + args.timeout + 60
            for n, proc in enumerate(procs):
                try:
                    code = proc.wait(max(0.1, bound - time.monotonic()))
                except subprocess.TimeoutExpired as exc:
                    raise BenchError(f"load generator {n} did not finish in time") from exc
                if code != 0:
                    raise BenchError(
                        f"load generator {n} exited with {code}:\n"
                        + tail(self.tmp / f"{name}-{n}.loadgen.err")
                    )
        finally:
            sampler.stop()
            if spy is not None:
                self._finish_py_spy(spy, profile)
        merged: dict[str, Any] = {"ok": 0, "requests": 0, "errors": {}, "outside": {}}
        client_cpu, samples, conns = [], [], 0
        for path in results:
            r = json.loads(path.read_text())
            merged["ok"] += r["ok"]
            merged["requests"] += r["latencies"]
            for key, src in (("errors", "errors"), ("outside", "errors_outside_window")):
                for code, count in r[src].items():
                    merged[key][code] = merged[key].get(code, 0) + count
            if r["cpu_seconds"] is not None:
                client_cpu.append(r["cpu_seconds"] / args.duration)
            samples.extend(r["samples"])
            conns += r["connections"]
        return LoadResult(
            ok=merged["ok"],
            requests=merged["requests"],
            errors=merged["errors"],
            errors_outside=merged["outside"],
            latencies=load_latencies(latencies),
            client_cpu=client_cpu,
            samples=samples,
            connections=conns,
            window=window,
            server_cpu_seconds=cpu_end - cpu_start,
            machine_busy_seconds=busy_end - busy_start,
            rss_start=first.rss,
            rss_peak=sampler.peak_rss(),
            processes=processes,
            connections_seen=sampler.peak_connections(*window),
            connections_per_process=spread,
            kms_calls=_delta(calls_end, calls_start),
            database_cpu_seconds=(
                db_end - db_start if db_end is not None and db_start is not None else None
            ),
        )

    def _start_py_spy(self, pid: int, out: Path) -> subprocess.Popen[bytes]:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(out.suffix, "raw")
        argv = [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            *(["--gil"] if os.environ.get("MESHCA_BENCH_GIL") else ["--idle"]),
            "--threads",
            "--rate",
            str(PY_SPY_RATE),
            "--duration",
            str(max(1, int(self.args.duration))),
            "--format",
            fmt,
            "--output",
            str(out),
        ]
        # Native stacks need the process paused while sampled; Python-only ones do not.
        argv.append("--native" if self.args.py_spy_native else "--nonblocking")
        with (self.tmp / "py-spy.log").open("wb") as log:
            return self.children.start(argv, stdout=log, stderr=subprocess.STDOUT)

    def _finish_py_spy(self, spy: subprocess.Popen[bytes], out: Path | None) -> None:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            self.children.stop(spy)
        if out is None or not out.exists():
            self.notes.append(f"py-spy wrote no profile: {tail(self.tmp / 'py-spy.log', 5)}")
            return

    def summarise(self, name: str, endpoint: str, load: LoadResult, check: str) -> ServerRun:
        run = ServerRun(
            name=name,
            endpoint=endpoint,
            requests=load.requests,
            certs=load.ok,
            certs_per_s=load.ok / self.args.duration,
            latency_ms=Latency.of(load.latencies),
            errors=load.errors,
            errors_outside_window=load.errors_outside,
            rss_start_mib=load.rss_start / MIB,
            rss_peak_mib=load.rss_peak / MIB,
            server_cpu_cores=load.server_cpu_seconds / self.args.duration,
            other_cpu_cores=max(
                0.0,
                (load.machine_busy_seconds - load.server_cpu_seconds) / self.args.duration
                - sum(load.client_cpu),
            ),
            client_cpu_cores=load.client_cpu,
            connections_seen=load.connections_seen,
            connections_per_process=load.connections_per_process,
            sample_check=check,
            processes=load.processes,
            database_cpu_cores=(
                None
                if load.database_cpu_seconds is None
                else load.database_cpu_seconds / self.args.duration
            ),
        )
        if load.database_cpu_seconds is not None:
            # The backends' CPU is the machine's too: not "other processes'" CPU.
            run.other_cpu_cores = max(0.0, run.other_cpu_cores - run.database_cpu_cores)
        if any(c > 0.85 for c in load.client_cpu):
            run.notes.append(
                "a load generator used more than 0.85 of a core: it may be the bottleneck; "
                "try --load-procs 2 (on a machine with cores to spare)"
            )
        if load.connections_seen and load.connections_seen != load.connections:
            run.notes.append(
                f"{load.connections} connections asked for, {load.connections_seen} seen"
            )
        return run

    # -- meshca --------------------------------------------------------------------

    def meshca(self, database: str = "sqlite") -> ServerRun:
        args = self.args
        state = self.tmp / f"meshca-state-{database}"
        backend = self.backend
        assert backend is not None
        admission = self._admission_settings()
        pg_url = None
        if database == "postgres":
            assert self.postgres is not None
            pg_url = self.postgres.create("meshca_bench")
            admission["database_url"] = sqlalchemy_url(pg_url)
        config = meshca_config(self.tmp, self.issuer, {**admission, **backend.settings()})
        created = backend.create_root(
            MESHCA, config, state, self.tmp / "root-create.log", PROJECT_ROOT
        )
        if created is not None:
            say(f"root: {shlex.join(created[1:])} -> {backend.kind}: {backend.root_ref}")
            # gcpkms: the signer section names the key version root create just made.
            config = meshca_config(self.tmp, self.issuer, {**admission, **backend.settings()})
        argv = [
            *MESHCA,
            "server",
            "--config",
            str(config),
            "--state-dir",
            str(state),
            "--grpc-listen",
            "127.0.0.1:0",
            "--grpc-mtls-listen",
            "off",
            "--http-listen",
            "127.0.0.1:0",
            "--log-level",
            args.meshca_log_level,
        ]
        has_workers = self._meshca_has_workers()
        workers_note = "workers: meshca's default" if has_workers else "single process"
        if args.workers is not None:
            if has_workers:
                argv += ["--workers", str(args.workers)]
                workers_note = f"--workers {args.workers}"
            else:
                workers_note = (
                    f"single process ('meshca server' has no --workers; {args.workers} ignored)"
                )
                self.notes.append(f"meshca: {workers_note}")
        self.workers_note = workers_note
        name = "meshca" if database == "sqlite" else "meshca (PostgreSQL)"
        out, err = self.tmp / f"meshca-{database}.out", self.tmp / f"meshca-{database}.err"
        with out.open("wb") as o, err.open("wb") as e:
            server = self.children.start(
                argv, stdout=o, stderr=e, cwd=PROJECT_ROOT, env=backend.environ()
            )
        say(f"meshca: {shlex.join(argv[1:])}")
        line = wait_for_text(out, server, "meshca ready", START_TIMEOUT)
        match = READY.search(line or "")
        if match is None:
            raise BenchError(f"meshca did not start:\n{tail(out)}\n{tail(err)}")
        grpc_port, http_port = int(match["grpc"]), int(match["http"])
        if match["mode"] != "TLS":
            raise BenchError(f"meshca serves gRPC in {match['mode']}, expected TLS")
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/bundle", timeout=10) as r:
            bundle_pem = r.read().decode()
        bundle = x509.load_pem_x509_certificates(bundle_pem.encode())
        say(f"meshca ready: gRPC 127.0.0.1:{grpc_port}, bundle of {len(bundle)} root(s)")
        spec = {
            "mode": "grpc",
            "target": f"127.0.0.1:{grpc_port}",
            "root_pem": bundle_pem,
            "server_name": "localhost",
            "cluster_id": CLUSTER_ID,
        }
        try:
            profile = args.py_spy if database == args.databases[0] else None
            load = self.drive(
                f"meshca-{database}",
                server,
                grpc_port,
                spec,
                profile=profile,
                counters=backend.kms_calls,
                database_cpu=self._backend_cpu(pg_url),
            )
        finally:
            code = self.children.stop(server, grace=15)
        if code not in (0, -signal.SIGTERM):
            self.notes.append(f"meshca exited with status {code} on SIGTERM")
        check = verify_meshca(load.samples, bundle)
        run = self.summarise(name, f"gRPC TLS 127.0.0.1:{grpc_port}", load, check)
        run.database = (
            "SQLite (WAL, synchronous FULL)"
            if pg_url is None
            else f"PostgreSQL {pg_url.host}:{pg_url.port or 5432} ({self.postgres_settings})"
        )
        run.root_key = f"{backend.kind}, issuing key {backend.issuing_key}"
        run.kms_calls_window = load.kms_calls
        run.kms_calls_total = backend.kms_calls()
        run.notes += backend.notes(load.kms_calls, err.read_text(errors="replace"))
        if profile is not None and profile.exists() and profile.suffix not in (".svg", ".json"):
            self.profile_summary = summarise_raw(
                profile.read_text(), rate=PY_SPY_RATE, seconds=args.duration, certs=load.ok
            )
        if pg_url is None:
            rows = ledger_rows(state / "meshca.db")
            intermediates = intermediate_rows(state / "meshca.db")
        else:
            assert self.postgres is not None
            rows = self.postgres.count(pg_url, "ledger")
            intermediates = self.postgres.count(pg_url, "intermediates")
        if rows is not None:
            run.notes.append(
                f"ledger holds {rows} rows after the run "
                f"({load.ok} issued in the window, the rest in warmup/tail/server cert)"
            )
        if intermediates is not None:
            run.notes.append(
                f"the root signed {intermediates} issuing intermediate(s) in all "
                f"({run.processes} server processes)"
            )
        return run

    def _backend_cpu(self, url: URL | None) -> Callable[[], float | None] | None:
        """Reads the PostgreSQL server's CPU for a run on ``url`` (None: SQLite, whose
        work is done inside the server process and counted there)."""
        if url is None or self.postgres is None:
            return None
        return self.postgres.server_cpu

    def _admission_settings(self) -> dict[str, Any]:
        """Config for meshca's admission control, for the settings this meshca has.

        Rate limits are per peer IP and per SPIFFE ID; all load comes from 127.0.0.1, so
        the per-peer default would cap the measurement. Off unless --rate-limits.
        """
        from meshca.config import Settings

        fields = Settings.model_fields
        extra: dict[str, Any] = {}
        if "max_in_flight" in fields:
            default = fields["max_in_flight"].default
            if isinstance(default, int) and default < self.args.concurrency:
                extra["max_in_flight"] = self.args.concurrency
        if self.args.rate_limits:
            self.notes.append("meshca: default admission rate limits kept (--rate-limits)")
            return extra
        off = [
            name for name in ("rate_limit_per_peer", "rate_limit_per_identity") if name in fields
        ]
        for name in off:
            extra[name] = "off"
        note = f"meshca: {', '.join(off)} off for the benchmark (--rate-limits keeps them)"
        if off and note not in self.notes:
            self.notes.append(note)
        return extra

    def _meshca_has_workers(self) -> bool:
        try:
            result = subprocess.run(
                [*MESHCA, "server", "--help"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                cwd=PROJECT_ROOT,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return "--workers" in result.stdout

    # -- cfssl ---------------------------------------------------------------------

    def cfssl(self, certdb: str | None = None) -> ServerRun:
        """cfssl serve; with ``certdb`` ("sqlite" or "postgres") every certificate it signs
        is stored in its certificate database before it answers (``-db-config``)."""
        args = self.args
        files = cfssl_ca(args.cfssl, self.tmp / "cfssl", tls=args.cfssl_tls)
        root = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        db_args: list[str] = []
        db_file = pg_url = None
        if certdb == "sqlite":
            db_file = self.tmp / "cfssl" / f"certdb-{secrets.token_hex(4)}.sqlite"
            certdb_sqlite(db_file)
            db_args = [
                "-db-config",
                str(certdb_config(self.tmp / "cfssl", "sqlite3", str(db_file))),
            ]
        elif certdb == "postgres":
            assert self.postgres is not None
            pg_url = self.postgres.create("cfssl_bench")
            certdb_postgres(pg_url)
            config = certdb_config(self.tmp / "cfssl", "postgres", libpq_url(pg_url))
            db_args = ["-db-config", str(config)]
        name = {
            None: "cfssl",
            "sqlite": "cfssl+certdb (SQLite)",
            "postgres": "cfssl+certdb (PostgreSQL)",
        }[certdb]
        log_path = self.tmp / f"{name.split()[0]}-{certdb or 'nodb'}.log"
        server: subprocess.Popen[bytes] | None = None
        port = 0
        for _attempt in range(3):
            port = free_port()
            argv = [
                args.cfssl,
                "serve",
                "-address",
                "127.0.0.1",
                "-port",
                str(port),
                "-ca",
                str(files.ca_cert),
                "-ca-key",
                str(files.ca_key),
                "-config",
                str(files.config),
                *db_args,
            ]
            if files.tls_cert and files.tls_key:
                argv += ["-tls-cert", str(files.tls_cert), "-tls-key", str(files.tls_key)]
            with log_path.open("wb") as log:
                server = self.children.start(argv, stdout=log, stderr=subprocess.STDOUT)
            if wait_for_port(port, server, 30):
                break
            self.children.stop(server)
            server = None
        if server is None:
            raise BenchError(f"cfssl serve did not start:\n{tail(log_path)}")
        say(f"cfssl: {shlex.join(argv)}")
        scheme = "https" if args.cfssl_tls else "http"
        spec = {
            "mode": "http",
            "target": f"{scheme}://127.0.0.1:{port}/api/v1/cfssl/sign",
            "ca_file": str(files.ca_cert) if args.cfssl_tls else None,
        }
        pool_size = args.cfssl_connections or args.connections
        try:
            load = self.drive(
                f"cfssl-{certdb or 'nodb'}",
                server,
                port,
                spec,
                connections=pool_size,
                database_cpu=self._backend_cpu(pg_url),
            )
        finally:
            self.children.stop(server)
        check = verify_cfssl(load.samples, root)
        endpoint = f"{'HTTPS' if args.cfssl_tls else 'HTTP'} 127.0.0.1:{port}"
        run = self.summarise(name, endpoint, load, check)
        run.root_key = "file (ca-key.pem; the root signs every certificate)"
        if certdb is None:
            run.database = "none"
            run.notes.append(
                "no caller authentication, no record of what it signs (no -db-config)"
                + ("" if args.cfssl_tls else ", no TLS")
            )
        else:
            if db_file is not None:
                run.database = "SQLite (cfssl's defaults: rollback journal, synchronous FULL)"
                rows = certdb_sqlite_rows(db_file)
            else:
                assert self.postgres is not None and pg_url is not None
                run.database = (
                    f"PostgreSQL {pg_url.host}:{pg_url.port or 5432} ({self.postgres_settings})"
                )
                rows = self.postgres.count(pg_url, "certificates")
            run.notes.append(
                f"certdb holds {rows} certificates after the run ({load.ok} in the window); "
                "no caller authentication" + ("" if args.cfssl_tls else ", no TLS")
            )
        if load.samples and not any(uri_sans(s) for s in load.samples):
            run.notes.append(
                "certificates carry no SAN: this cfssl drops the CSR's URI SAN (a 'hosts' "
                "entry would become a DNS name, so none is sent)"
            )
        return run

    # -- the floor -----------------------------------------------------------------

    def floor(self, work: str) -> ServerRun:
        """The null CA (bench/_null_ca.py) with meshca's worker count, driven the same way:
        ``work`` "none" answers a fixed chain, "sign" does cfssl's work in Python."""
        args = self.args
        cert, key = localhost_tls(self.tmp / "null-ca")
        workers = args.workers or os.cpu_count() or 1
        port = free_port()
        argv = [sys.executable, str(NULL_CA), "--port", str(port), "--workers", str(workers)]
        argv += ["--cert", str(cert), "--key", str(key), "--work", work]
        name = f"null-ca-{work}"
        out = self.tmp / f"{name}.out"
        with out.open("wb") as o, (self.tmp / f"{name}.err").open("wb") as e:
            server = self.children.start(argv, stdout=o, stderr=e, cwd=PROJECT_ROOT)
        if wait_for_text(out, server, "READY", START_TIMEOUT) is None:
            raise BenchError(f"the null CA did not start:\n{tail(self.tmp / f'{name}.err')}")
        say(f"null CA (--work {work}): {workers} process(es) on 127.0.0.1:{port}")
        spec = {
            "mode": "grpc",
            "target": f"127.0.0.1:{port}",
            "root_pem": cert.read_text(),
            "server_name": "localhost",
            "cluster_id": CLUSTER_ID,
        }
        try:
            load = self.drive(name, server, port, spec)
        finally:
            self.children.stop(server)
        label = "grpc floor" if work == "none" else "grpc + sign"
        if work == "none":
            check = "not checked (a fixed answer)"
        else:
            issuer = x509.load_pem_x509_certificate(cert.read_bytes())
            check = verify_cfssl(load.samples, issuer, "null CA key")
        run = self.summarise(label, f"gRPC TLS 127.0.0.1:{port}", load, check)
        run.root_key = "none: no signing" if work == "none" else "key in memory"
        run.notes.append(
            f"grpcio's asyncio server, TLS, {workers} process(es); "
            + (
                "a fixed 3-certificate answer: no token check, CSR parsing, signing or ledger"
                if work == "none"
                else "parses the CSR, verifies its signature, builds and signs a leaf "
                "(what cfssl does): no token check, SPIFFE checks, ledger or logging"
            )
        )
        return run

    # -- the whole run -------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        args = self.args
        facts = machine_facts(PROJECT_ROOT, None if args.skip_cfssl else args.cfssl)
        facts["loadavg_before"] = loadavg()
        started = time.perf_counter()
        self.issuer = TokenIssuer.create(self.tmp)
        self.pool = make_pool(self.issuer, args.identities, now=int(time.time()), token_ttl=3600)
        say(f"{len(self.pool)} identities (tokens + CSRs) in {time.perf_counter() - started:.2f}s")
        self.workers_note = "not measured (--skip-meshca)"
        databases = list(args.databases)
        self.postgres_settings = "-"
        if "postgres" in databases:
            self.postgres, why = PostgresDatabases.reach(args.postgres_url)
            if self.postgres is None:
                databases.remove("postgres")
                self.notes.append(f"{why}: the PostgreSQL runs are left out")
            else:
                self.postgres_settings = why
        try:
            runs = self._measure(databases)
        finally:
            if self.postgres is not None:
                self.postgres.drop_all()
        by_name = {r.name: r for r in runs}
        facts["loadavg_after"] = loadavg()
        ratios = {}
        for ours, peer in (
            ("meshca", "cfssl+certdb (SQLite)"),
            ("meshca (PostgreSQL)", "cfssl+certdb (PostgreSQL)"),
            ("meshca", "cfssl"),
            ("meshca (PostgreSQL)", "cfssl"),
            ("grpc floor", "cfssl"),
            ("grpc + sign", "cfssl"),
        ):
            if ours in by_name and peer in by_name and by_name[peer].certs_per_s > 0:
                ratios[f"{ours} / {peer}"] = by_name[ours].certs_per_s / by_name[peer].certs_per_s
        cpus = facts.get("cpus_usable") or facts.get("nproc") or 0
        if cpus and cpus < 4:
            self.notes.append(
                f"only {cpus} CPUs: server and load generators share them, so figures are "
                "lower than on a machine where the client has cores of its own"
            )
        report: dict[str, Any] = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": facts,
            "settings": {
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "concurrency": args.concurrency,
                "connections": args.connections,
                "load_procs": args.load_procs,
                "identities": args.identities,
                "timeout_s": args.timeout,
                "meshca_workers": self.workers_note,
                "meshca_log_level": args.meshca_log_level,
                "signer": args.signer,
                "issuing_key": args.issuing_key,
                "cfssl_tls": args.cfssl_tls,
                "databases": databases,
                "postgres": self.postgres_settings,
            },
            "servers": {r.name: r.as_json() for r in runs},
            "ratios": ratios,
            "ratio": ratios.get("meshca / cfssl"),
            "notes": self.notes,
            "profile": self.profile_summary,
        }
        report["text"] = render(report, runs)
        return report

    def _measure(self, databases: list[str]) -> list[ServerRun]:
        """Every server in turn: meshca and cfssl+certdb on each database (SQLite first),
        then the floors, then cfssl without a database."""
        args = self.args
        runs: list[ServerRun] = []
        for database in databases:
            if not args.skip_meshca:
                self.backend = open_backend(args.signer, args.issuing_key, self.tmp, PROJECT_ROOT)
                try:
                    runs.append(self.meshca(database))
                finally:
                    self.backend.close()
                say(f"{runs[-1].name}: {runs[-1].certs_per_s:.1f} certs/s")
            if not args.skip_cfssl and not args.skip_certdb:
                runs.append(self.cfssl(database))
                say(f"{runs[-1].name}: {runs[-1].certs_per_s:.1f} certs/s")
        if args.floor:
            for work in ("none", "sign"):
                runs.append(self.floor(work))
                say(f"{runs[-1].name}: {runs[-1].certs_per_s:.1f} answers/s")
        if not args.skip_cfssl:
            runs.append(self.cfssl())
            say(f"{runs[-1].name}: {runs[-1].certs_per_s:.1f} certs/s")
        return runs


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="meshca-bench-"))
    try:
        report = Bench(args, tmp, children).run()
    except KeyboardInterrupt:
        say("interrupted; stopping everything")
        return 130
    except (BenchError, RuntimeError, OSError) as exc:
        say(f"failed: {exc}")
        return 1
    finally:
        children.stop_all()
        if args.keep_tmp:
            say(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    text = report.pop("text")
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(report), flush=True)
    else:
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
