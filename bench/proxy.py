"""The mTLS sidecar proxy: ``meshca proxy`` against haproxy doing the same job, same run.

    .venv/bin/python bench/proxy.py                       # --workers 1, 10s per figure
    .venv/bin/python bench/proxy.py --workers 2 --duration 15s --json > proxy.json

Needs Debian's haproxy, wrk and openssl (``apt install haproxy wrk``). Everything runs on
loopback on this machine; both proxies get the same certificates (ECDSA P-256, leaves
signed by the root), the same applications and the same clients, one after the other:

    client -> outbound sidecar (plain in, mTLS out) -> inbound sidecar (mTLS in) -> app

- handshakes/s: ``openssl s_time -new -www /`` (``--clients`` processes in parallel) against
  the inbound sidecar: a full TLS 1.3 handshake with a client certificate, one HTTP/1.0
  request answered by the app, close. Session resumption is off on both. Each timed
  window follows a 2 s warm-up.
- requests/s: ``wrk`` with kept-alive HTTP/1.1 connections through both sidecars (wrk
  has no client certificates, so it speaks plain HTTP to the outbound sidecar).
- MB/s: one connection through both sidecars reading ``--bulk-mb`` from a sendfile server
  (median of three, after a warm-up read).
- added latency: one kept-alive connection, sequential small HTTP requests; p50/p99
  round trip through both sidecars minus the same directly to the app.
- CPU per unit: the proxies' own CPU time (user + system, all processes) per handshake,
  per request and per GB, which a shared machine disturbs less than the rates.

The app is a third haproxy answering ``200 ok`` by itself (``http-request return``), so the
app costs little and the same for both. meshca: ``meshca proxy --workers N`` (uvloop) with
credentials over the Workload API from a small in-process server, access log to a file.
haproxy: ``nbthread N``, ``mode tcp``, ``verify required`` with the same CA file; it checks
the chain only (no SPIFFE ID check, no policy) and writes no access log, so it does less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from _args import duration  # noqa: E402
from _procs import (  # noqa: E402
    BenchError,
    Children,
    cpu_seconds,
    free_port,
    loadavg,
    process_tree,
    read_line,
    wait_for_port,
)
from _report import git_commit, percentile  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from meshca.agent.credentials import CredentialStore  # noqa: E402
from meshca.agent.workload_api import WorkloadApiServer  # noqa: E402
from meshca.pki import profile  # noqa: E402
from meshca.pki.keys import KeyAlgorithm, PrivateKey  # noqa: E402
from meshca.spiffe import SpiffeId, TrustDomain  # noqa: E402

TD = TrustDomain("cluster.local")
FRONTEND = TD.workload("bench", "frontend")
BACKEND = TD.workload("bench", "backend")
CLIENT = TD.workload("bench", "client")
LATENCY_SAMPLES = 3000
WARMUP_SECONDS = 2
BULK_RUNS = 3  # the median is reported
REQUEST = b"GET / HTTP/1.1\r\nHost: app\r\n\r\n"


# -- identities ---------------------------------------------------------------------------
@dataclass
class Identity:
    spiffe_id: SpiffeId
    key: PrivateKey
    chain: tuple[Any, ...]

    def write(self, directory: Path) -> tuple[Path, Path, Path]:
        """cert, key and combined (haproxy's crt) PEM files."""
        name = self.spiffe_id.path.rsplit("/", 1)[-1]
        cert = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)
        key = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        paths = (directory / f"{name}.crt", directory / f"{name}.key", directory / f"{name}.pem")
        paths[0].write_bytes(cert)
        paths[1].write_bytes(key)
        paths[2].write_bytes(cert + key)
        return paths


class Pki:
    def __init__(self) -> None:
        now = datetime.now(UTC)
        self.root_key = KeyAlgorithm.EC_P256.generate()
        self.root = profile.build_root(self.root_key, TD, ttl=timedelta(days=2), now=now)

    def issue(self, spiffe_id: SpiffeId) -> Identity:
        key = KeyAlgorithm.EC_P256.generate()
        now = datetime.now(UTC)
        leaf = profile.build_svid(
            self.root_key,
            self.root,
            key.public_key(),
            spiffe_id,
            not_after=now + timedelta(hours=4),
            now=now,
        )
        return Identity(spiffe_id, key, (leaf,))


def serve_workload_apis(directory: Path) -> None:
    """``bench/proxy.py --serve-wlapi DIR``: a Workload API socket per identity in DIR
    (frontend, backend), from the PEM files written there; prints "ready"."""
    root = x509.load_pem_x509_certificate((directory / "root.pem").read_bytes())

    async def main() -> None:
        servers = []  # referenced while serving
        for name, spiffe_id in (("frontend", FRONTEND), ("backend", BACKEND)):
            chain = tuple(x509.load_pem_x509_certificates((directory / f"{name}.crt").read_bytes()))
            key = serialization.load_pem_private_key(
                (directory / f"{name}.key").read_bytes(), password=None
            )
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            store = CredentialStore()
            await store.publish(spiffe_id, key, chain, (root,))
            servers.append(WorkloadApiServer(directory / f"{name}.sock"))
            await servers[-1].start(store)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def start_workload_apis(children: Children, tmp: Path) -> dict[SpiffeId, Path]:
    proc = children.start(
        [sys.executable, __file__, "--serve-wlapi", str(tmp)], stdout=subprocess.PIPE
    )
    if read_line(proc, time.monotonic() + 30) != "ready":
        raise BenchError("the Workload API servers did not start")
    return {FRONTEND: tmp / "frontend.sock", BACKEND: tmp / "backend.sock"}


# -- applications -------------------------------------------------------------------------
class BulkServer:
    """Sends ``size`` bytes to every connection with sendfile (the kernel does the work)."""

    def __init__(self, directory: Path, size: int) -> None:
        self.file = directory / "bulk.bin"
        with self.file.open("wb") as f:
            f.truncate(size)
        self.size = size
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True, name="bulk").start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._send, args=(conn,), daemon=True).start()

    def _send(self, conn: socket.socket) -> None:
        with conn, self.file.open("rb") as f:
            try:
                conn.sendfile(f)
            except OSError:
                pass


HAPROXY_GLOBAL = """global
    nbthread {threads}
    maxconn 4000
defaults
    mode {mode}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""


def app_config(port: int) -> str:
    return (
        HAPROXY_GLOBAL.format(threads=1, mode="http")
        + f"""
frontend app
    bind 127.0.0.1:{port}
    http-request return status 200 content-type text/plain string "ok"
"""
    )


# -- the proxies under test -----------------------------------------------------------------
@dataclass
class Ports:
    in_http: int
    in_bulk: int
    out_http: int
    out_bulk: int


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def start_meshca(
    children: Children,
    args: argparse.Namespace,
    tmp: Path,
    wl: dict[SpiffeId, Path],
    app: int,
    bulk: int,
) -> tuple[Ports, list[subprocess.Popen[bytes]]]:
    ports = Ports(free_port(), free_port(), free_port(), free_port())
    common = ["--workers", str(args.workers), "--log-level", "WARNING"]
    health = [free_port(), free_port()]
    inbound = children.start(
        [
            sys.executable,
            "-m",
            "meshca",
            "proxy",
            *common,
            "--workload-api-socket",
            str(wl[BACKEND]),
            "--inbound",
            f"127.0.0.1:{ports.in_http}=127.0.0.1:{app}",
            "--inbound",
            f"127.0.0.1:{ports.in_bulk}=127.0.0.1:{bulk}",
            "--access-log",
            str(tmp / "meshca-inbound.log"),
            "--http-listen",
            f"127.0.0.1:{health[0]}",
        ],
        stderr=(tmp / "meshca-inbound.err").open("wb"),
    )
    outbound = children.start(
        [
            sys.executable,
            "-m",
            "meshca",
            "proxy",
            *common,
            "--workload-api-socket",
            str(wl[FRONTEND]),
            "--outbound",
            f"127.0.0.1:{ports.out_http}=127.0.0.1:{ports.in_http},{BACKEND}",
            "--outbound",
            f"127.0.0.1:{ports.out_bulk}=127.0.0.1:{ports.in_bulk},{BACKEND}",
            "--access-log",
            str(tmp / "meshca-outbound.log"),
            "--http-listen",
            f"127.0.0.1:{health[1]}",
        ],
        stderr=(tmp / "meshca-outbound.err").open("wb"),
    )
    for proc, port in ((inbound, health[0]), (outbound, health[1])):
        deadline = time.monotonic() + 60
        while not ready(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise BenchError(f"meshca proxy not ready: see {tmp}/*.err")
            time.sleep(0.1)
    return ports, [inbound, outbound]


def start_haproxy(
    children: Children,
    args: argparse.Namespace,
    tmp: Path,
    files: dict[str, Path],
    app: int,
    bulk: int,
) -> tuple[Ports, list[subprocess.Popen[bytes]]]:
    ports = Ports(free_port(), free_port(), free_port(), free_port())
    tls_in = (
        f"ssl crt {files['backend']} ca-file {files['root']} verify required "
        "ssl-min-ver TLSv1.3 no-tls-tickets"
    )
    tls_out = (
        f"ssl crt {files['frontend']} ca-file {files['root']} verify required "
        "ssl-min-ver TLSv1.3 no-ssl-reuse"
    )
    inbound = (
        HAPROXY_GLOBAL.format(threads=args.workers, mode="tcp")
        + f"""
frontend in_http
    bind 127.0.0.1:{ports.in_http} {tls_in}
    default_backend app
frontend in_bulk
    bind 127.0.0.1:{ports.in_bulk} {tls_in}
    default_backend bulk
backend app
    server app 127.0.0.1:{app}
backend bulk
    server bulk 127.0.0.1:{bulk}
"""
    )
    outbound = (
        HAPROXY_GLOBAL.format(threads=args.workers, mode="tcp")
        + f"""
frontend out_http
    bind 127.0.0.1:{ports.out_http}
    default_backend in_http
frontend out_bulk
    bind 127.0.0.1:{ports.out_bulk}
    default_backend in_bulk
backend in_http
    server in 127.0.0.1:{ports.in_http} {tls_out}
backend in_bulk
    server in 127.0.0.1:{ports.in_bulk} {tls_out}
"""
    )
    procs = []
    for name, text, port in (("in", inbound, ports.in_http), ("out", outbound, ports.out_http)):
        cfg = tmp / f"haproxy-{name}.cfg"
        cfg.write_text(text)
        proc = children.start(
            ["haproxy", "-db", "-f", str(cfg)], stderr=(tmp / f"haproxy-{name}.err").open("wb")
        )
        if not wait_for_port(port, proc, 30):
            raise BenchError(f"haproxy did not listen on {port}: see {tmp}/haproxy-{name}.err")
        procs.append(proc)
    return ports, procs


# -- measurements ---------------------------------------------------------------------------
def handshakes(port: int, files: dict[str, Path], seconds: float, clients: int) -> float:
    argv = [
        "openssl",
        "s_time",
        "-connect",
        f"127.0.0.1:{port}",
        "-new",
        "-www",
        "/",
        "-time",
        str(int(seconds)),
        "-cert",
        str(files["client_crt"]),
        "-key",
        str(files["client_key"]),
        "-CAfile",
        str(files["root"]),
    ]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(clients)
    ]
    total = 0.0
    for proc in procs:
        out = proc.communicate(timeout=seconds + 60)[0].decode(errors="replace")
        match = re.search(r"(\d+) connections in ([\d.]+) real seconds", out)
        if not match:
            raise BenchError(f"openssl s_time said: {out[-500:]}")
        total += int(match.group(1)) / float(match.group(2))
    return total


def wrk(port: int, seconds: float, connections: int) -> float:
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "1",
            "-c",
            str(connections),
            "-d",
            f"{int(seconds)}s",
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match or "Non-2xx" in out or "Socket errors" in out:
        raise BenchError(f"wrk said: {out[-800:]}")
    return float(match.group(1))


def bulk(port: int, size: int) -> float:
    buf = bytearray(1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        got, start = 0, time.perf_counter()
        while True:
            n = sock.recv_into(buf)
            if not n:
                break
            got += n
        elapsed = time.perf_counter() - start
    if got != size:
        raise BenchError(f"bulk: got {got} bytes of {size}")
    return got / elapsed / 1e6


def round_trips(port: int, samples: int) -> list[float]:
    """Sequential kept-alive requests; seconds per round trip, sorted."""
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(samples + 200):
            start = time.perf_counter()
            sock.sendall(REQUEST)
            data = b""
            while not data.endswith(b"ok"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise BenchError("latency: the connection closed")
                data += chunk
            if i >= 200:  # warm-up excluded
                times.append(time.perf_counter() - start)
    return sorted(times)


def cpu(procs: list[subprocess.Popen[bytes]]) -> float:
    """CPU seconds used so far by the proxies (every process of their trees)."""
    return cpu_seconds([pid for proc in procs for pid in process_tree(proc.pid)])


def measure(
    name: str,
    ports: Ports,
    args: argparse.Namespace,
    files: dict[str, Path],
    app: int,
    procs: list[subprocess.Popen[bytes]],
) -> dict[str, float]:
    secs = float(args.duration)
    inbound = procs[:1]
    print(f"[{name}] handshakes ...", file=sys.stderr, flush=True)
    handshakes(ports.in_http, files, WARMUP_SECONDS, args.clients)
    before = cpu(inbound)
    hs = handshakes(ports.in_http, files, secs, args.clients)
    hs_cpu = (cpu(inbound) - before) / (hs * secs)
    print(f"[{name}] wrk ...", file=sys.stderr, flush=True)
    wrk(ports.out_http, WARMUP_SECONDS, args.connections)
    before = cpu(procs)
    rps = wrk(ports.out_http, secs, args.connections)
    rq_cpu = (cpu(procs) - before) / (rps * secs)
    print(f"[{name}] bulk ...", file=sys.stderr, flush=True)
    size = args.bulk_mb * 1_000_000
    bulk(ports.out_bulk, size)  # warm-up: TCP windows, caches
    before = cpu(procs)
    mbs = statistics.median(bulk(ports.out_bulk, size) for _ in range(BULK_RUNS))
    gb_cpu = (cpu(procs) - before) / (BULK_RUNS * size / 1e9)
    print(f"[{name}] latency ...", file=sys.stderr, flush=True)
    direct = round_trips(app, LATENCY_SAMPLES)  # just before, on the same machine state
    rt = round_trips(ports.out_http, LATENCY_SAMPLES)
    return {
        "handshakes_per_s": hs,
        "requests_per_s": rps,
        "bulk_mb_per_s": mbs,
        "p50_ms": percentile(rt, 50) * 1000,
        "p99_ms": percentile(rt, 99) * 1000,
        "added_p50_ms": (percentile(rt, 50) - percentile(direct, 50)) * 1000,
        "added_p99_ms": (percentile(rt, 99) - percentile(direct, 99)) * 1000,
        "direct_p50_ms": percentile(direct, 50) * 1000,
        "direct_p99_ms": percentile(direct, 99) * 1000,
        "cpu_us_per_handshake": hs_cpu * 1e6,
        "cpu_us_per_request": rq_cpu * 1e6,
        "cpu_s_per_gb": gb_cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="meshca proxy worker processes = haproxy threads (default 1)",
    )
    parser.add_argument(
        "--duration",
        type=duration,
        default=10.0,
        help="length of each handshake and wrk window (default 10s)",
    )
    parser.add_argument(
        "--clients", type=int, default=2, help="parallel openssl s_time processes (default 2)"
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--bulk-mb", type=int, default=1000, help="MB per bulk read")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--serve-wlapi", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_wlapi is not None:
        serve_workload_apis(args.serve_wlapi)
        return 0
    for tool in ("haproxy", "wrk", "openssl"):
        if shutil.which(tool) is None:
            print(f"bench/proxy.py needs {tool}: apt install haproxy wrk openssl", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="meshca-bench-proxy-"))
    children = Children()
    try:
        pki = Pki()
        ids = {
            n: pki.issue(i)
            for n, i in (("frontend", FRONTEND), ("backend", BACKEND), ("client", CLIENT))
        }
        files: dict[str, Path] = {"root": tmp / "root.pem"}
        files["root"].write_bytes(pki.root.public_bytes(serialization.Encoding.PEM))
        for name, ident in ids.items():
            crt, key, pem = ident.write(tmp)
            files[name] = pem
            files[f"{name}_crt"], files[f"{name}_key"] = crt, key
        wl = start_workload_apis(children, tmp)
        app = free_port()
        (tmp / "app.cfg").write_text(app_config(app))
        app_proc = children.start(["haproxy", "-db", "-f", str(tmp / "app.cfg")])
        if not wait_for_port(app, app_proc, 30):
            raise BenchError("the app (haproxy) did not start")
        bulk_server = BulkServer(tmp, args.bulk_mb * 1_000_000)
        results: dict[str, dict[str, float]] = {}
        ports, procs = start_meshca(children, args, tmp, wl, app, bulk_server.port)
        results["meshca"] = measure("meshca", ports, args, files, app, procs)
        for proc in procs:
            children.stop(proc)
        ports, procs = start_haproxy(children, args, tmp, files, app, bulk_server.port)
        results["haproxy"] = measure("haproxy", ports, args, files, app, procs)
        for proc in procs:
            children.stop(proc)
        allowed = sum(
            1
            for line in (tmp / "meshca-inbound.log").read_text().splitlines()
            if json.loads(line)["decision"] == "allow"
        )
    except BenchError as exc:
        print(f"bench/proxy.py: {exc}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
    report = {
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "commit": git_commit(PROJECT_ROOT),
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "load_after": loadavg(),
        "meshca_inbound_allowed_connections": allowed,
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    m, h = results["meshca"], results["haproxy"]
    print(f"command: {report['command']}")
    print(
        f"commit {report['commit']}; {args.workers} worker(s)/thread(s); "
        f"{report['cpus']} CPUs; load after: {report['load_after']}"
    )
    print(f"{'figure':32} {'meshca':>12} {'haproxy':>12} {'ratio':>8}")
    for key, label in (
        ("handshakes_per_s", "new mTLS handshakes/s"),
        ("requests_per_s", "kept-alive requests/s (wrk)"),
        ("bulk_mb_per_s", "bulk MB/s"),
        ("added_p50_ms", "added p50 latency (ms)"),
        ("added_p99_ms", "added p99 latency (ms)"),
        ("cpu_us_per_handshake", "inbound CPU us per handshake"),
        ("cpu_us_per_request", "both sidecars' CPU us per request"),
        ("cpu_s_per_gb", "both sidecars' CPU s per GB"),
    ):
        ratio = m[key] / h[key] if h[key] else float("nan")
        print(f"{label:32} {m[key]:12.2f} {h[key]:12.2f} {ratio:8.2f}")
    print(
        f"direct to the app, just before each latency run: p50 {m['direct_p50_ms']:.3f} / "
        f"{h['direct_p50_ms']:.3f} ms, p99 {m['direct_p99_ms']:.3f} / {h['direct_p99_ms']:.3f} "
        f"ms; meshca inbound allowed {allowed} connections (access log)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
