"""The node agent: memory, renewal-to-push latency and CPU per renewal, over loopback.

    .venv/bin/python bench/agent.py [--streams 100] [--rotations 20] [--ttl 6s] [--json]

1. In this process: a fake Kubernetes API (tests/fakes/kube.py: OIDC discovery and JWKS;
   it mints the projected token) and a meshca CA (``meshca.server.start_server``: JWT
   mode against the fake, gRPC over TLS on 127.0.0.1, port 0, SQLite ledger), with
   ``default_ttl`` = ``--ttl`` and ``max_ttl`` = max(``--ttl``, 1h). The CA bundle
   (``/v1/bundle``) and a token for ``default/web`` are written to files.
2. A quiet agent: ``meshca agent --ttl 1h`` as a subprocess, no clients. Its CPU over
   ``--idle-window`` is the idle cost with no renewal due; then 200 ``/metrics`` scrapes
   give the CPU of one scrape. It is stopped before the main agent starts.
3. The main agent: ``meshca agent --ttl <--ttl>`` (SDS and Workload API sockets, health
   and metrics on 127.0.0.1), waited for on ``/readyz``. After ``--settle``, its CPU over
   ``--idle-window`` with no clients (renewals go on every ~ttl/2) and its VmRSS.
4. ``--streams`` SDS streams (tests/agent/sds_client.py's EnvoySdsClient, in this process,
   one gRPC channel each) and one py-spiffe ``X509Source`` (bench/_agent_wlapi.py, a
   subprocess); VmRSS again once every client holds the certificate.
5. ``--rotations`` renewals: for each, the agent's renewal time is its
   ``meshca_agent_last_renewal_timestamp_seconds`` (set right after the new credentials
   are published to the sinks, before any of them runs), scraped once per rotation after
   the push; the arrival times are each SDS stream's and py-spiffe's. The CA ledger's
   ``issued_at`` of each serial is shown for context. Agent CPU over the window divided
   by the renewals in it is the CPU per renewal.

With ``--floor``, first: bench/_agent_floor.py (grpcio and cryptography doing the least
an agent does) against the same CA, its VmRSS after ``--settle``: the bound below which
no agent on this stack goes.

The report goes to stdout; with ``--json`` the report goes to stderr and one JSON object
to stdout. Only loopback addresses and Unix sockets in a temp dir are used; every child
process is stopped on exit, Ctrl-C or SIGTERM, and the CA and SDS streams are closed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))  # for the tests package (fakes, SDS client)

import aiohttp  # noqa: E402
from _agent_peers import Agent, WlapiWatcher, all_streams_hold, first_arrival  # noqa: E402
from _agent_report import Rotation, latencies, render  # noqa: E402
from _args import duration, positive  # noqa: E402
from _procs import (  # noqa: E402
    CLOCK_TICKS,
    BenchError,
    Children,
    cpu_seconds,
    free_port,
    loadavg,
    machine_busy_seconds,
    rss_bytes,
    tail,
)
from _report import MIB, machine_facts  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from meshca.config import load_settings  # noqa: E402
from meshca.durations import format_duration  # noqa: E402
from meshca.server import RunningServer, start_server  # noqa: E402
from tests.agent.sds_client import EnvoySdsClient  # noqa: E402
from tests.fakes.kube import FakeKubeApi  # noqa: E402

WLAPI_CLIENT = BENCH_DIR / "_agent_wlapi.py"
FLOOR = BENCH_DIR / "_agent_floor.py"
QUIET_TTL = timedelta(hours=1)
TOKEN_TTL = timedelta(hours=2)
MAX_ROTATION_TIME = 3600.0
"""The token lives 2h; rotations expected to take longer than an hour are refused."""
START_TIMEOUT = 60.0
WLAPI_GRACE = 5.0
"""How long after the last SDS stream py-spiffe may take before a rotation counts as
not seen by it."""
METRIC_SCRAPES = 200
RSS_INTERVAL = 0.25
RENEWALS = "meshca_agent_renewals_total"
LAST_RENEWAL = "meshca_agent_last_renewal_timestamp_seconds"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/agent.py",
        description="meshca agent: RSS, renewal-to-push latency (SDS, Workload API), CPU.",
    )
    parser.add_argument("--streams", type=positive, default=100, help="SDS streams (100)")
    parser.add_argument("--rotations", type=positive, default=20, help="renewals timed (20)")
    parser.add_argument("--ttl", type=duration, default=6.0, help="certificate life (6s)")
    parser.add_argument("--settle", type=duration, default=3.0, help="before RSS (3s)")
    parser.add_argument("--idle-window", type=duration, default=15.0, help="idle CPU windows (15s)")
    parser.add_argument("--skip-quiet", action="store_true", help="no quiet (--ttl 1h) agent phase")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also the RSS of bench/_agent_floor.py (grpcio + cryptography doing the least)",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir, print it")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, report on stderr")
    args = parser.parse_args(argv)
    if not 2.0 <= args.ttl <= 600.0:
        parser.error("--ttl must be between 2s and 10m (X.509 times have whole seconds)")
    if args.rotations * args.ttl * 0.55 > MAX_ROTATION_TIME:
        parser.error(f"--rotations x --ttl/2 must stay under {MAX_ROTATION_TIME:g}s")
    if args.streams > 2000:
        parser.error("--streams must be at most 2000 (one Unix socket connection each)")
    if not 1.0 <= args.idle_window <= 600.0:
        parser.error("--idle-window must be between 1s and 10m")
    if not 0.0 <= args.settle <= 60.0:
        parser.error("--settle must be between 0 and 60s")
    return args


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, children: Children) -> None:
        self.args = args
        self.tmp = tmp
        self.children = children
        self.notes: list[str] = []
        self.ttl = timedelta(seconds=args.ttl)
        self.ca_max_ttl = max(self.ttl, QUIET_TTL)
        self.ca: RunningServer | None = None
        self.session: aiohttp.ClientSession | None = None
        self.bundle_file = tmp / "ca-bundle.pem"
        self.token_file = tmp / "token"
        self.peak_rss = 0
        self.floor_rss: int | None = None

    # -- the CA --------------------------------------------------------------------

    async def start_ca(self, kube: FakeKubeApi) -> RunningServer:
        settings = load_settings(
            state_dir=self.tmp / "ca-state",
            grpc_listen="127.0.0.1:0",
            grpc_mtls_listen="off",
            http_listen="127.0.0.1:0",
            k8s_oidc_issuer=kube.issuer,
            default_ttl=format_duration(self.ttl),
            max_ttl=format_duration(self.ca_max_ttl),
        )
        ca = await start_server(settings)
        assert self.session is not None
        url = f"http://127.0.0.1:{ca.http_port}/v1/bundle"
        async with asyncio.timeout(10), self.session.get(url) as resp:
            self.bundle_file.write_bytes(await resp.read())
        token = kube.mint_token("default", "web", ttl=TOKEN_TTL)
        self.token_file.write_text(token + "\n")
        self.token_file.chmod(0o600)
        say(f"CA: gRPC TLS 127.0.0.1:{ca.grpc_port}, default_ttl {format_duration(self.ttl)}")
        return ca

    # -- agents --------------------------------------------------------------------

    def agent_argv(self, name: str, ttl: timedelta, http_port: int) -> list[str]:
        assert self.ca is not None
        return [
            sys.executable,
            "-m",
            "meshca",
            "agent",
            "--ca-address",
            f"127.0.0.1:{self.ca.grpc_port}",
            "--ca-server-name",
            "localhost",
            "--ca-trust-bundle",
            str(self.bundle_file),
            "--token-file",
            str(self.token_file),
            "--ttl",
            format_duration(ttl),
            "--sds-socket",
            str(self.tmp / f"{name}-sds.sock"),
            "--workload-api-socket",
            str(self.tmp / f"{name}-wl.sock"),
            "--http-listen",
            f"127.0.0.1:{http_port}",
        ]

    async def start_agent(self, name: str, ttl: timedelta) -> Agent:
        assert self.session is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
        log = self.tmp / f"{name}-agent.log"
        for attempt in range(3):
            argv = self.agent_argv(name, ttl, free_port())
            with log.open("wb") as out:
                proc = self.children.start(
                    argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT
                )
            agent = Agent(proc, argv, int(argv[-1].rpartition(":")[2]), log, self.session)
            try:
                if await agent.wait_ready(START_TIMEOUT):
                    say(f"{name} agent ready (pid {proc.pid}): {shlex.join(argv[1:])}")
                    return agent
            except TimeoutError:
                await self.stop_agent(agent)
                raise BenchError(
                    f"{name} agent not ready in {START_TIMEOUT:g}s:\n{tail(log)}"
                ) from None
            await self.stop_agent(agent)
            if "cannot listen for HTTP" not in tail(log) or attempt == 2:
                break
        raise BenchError(f"{name} agent did not start:\n{tail(log)}")

    async def stop_agent(self, agent: Agent) -> int | None:
        return await asyncio.to_thread(self.children.stop, agent.proc, 15.0)

    async def sample_rss(self, agent: Agent) -> None:
        while agent.proc.poll() is None:
            self.peak_rss = max(self.peak_rss, agent.rss())
            await asyncio.sleep(RSS_INTERVAL)

    def log_problems(self, agent: Agent, name: str) -> None:
        text = agent.log.read_text(errors="replace").splitlines()
        problems = [line for line in text if " WARNING " in line or " ERROR " in line]
        if problems:
            self.notes.append(
                f"{name} agent logged {len(problems)} warning/error line(s), e.g.: "
                + problems[0][:300]
            )

    # -- phase 0: the floor (--floor) --------------------------------------------

    async def floor(self) -> int:
        """VmRSS of bench/_agent_floor.py after ``--settle``: grpcio and cryptography
        doing the least an agent does (one certificate, a gRPC and an HTTP listener)."""
        assert self.ca is not None
        argv = [
            sys.executable,
            str(FLOOR),
            f"127.0.0.1:{self.ca.grpc_port}",
            str(self.bundle_file),
            str(self.token_file),
            str(self.tmp / "floor.sock"),
        ]
        with (self.tmp / "floor.err").open("wb") as err:
            proc = self.children.start(argv, stdout=subprocess.PIPE, stderr=err, cwd=PROJECT_ROOT)
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(START_TIMEOUT):
                line = await asyncio.to_thread(proc.stdout.readline)
            if not line.startswith(b"ready"):
                raise BenchError(f"floor process failed:\n{tail(self.tmp / 'floor.err')}")
            await asyncio.sleep(self.args.settle)
            rss = rss_bytes([proc.pid])
        finally:
            await asyncio.to_thread(self.children.stop, proc, 10.0)
        say(f"floor (grpcio + cryptography, bench/_agent_floor.py): RSS {rss / MIB:.1f} MiB")
        return rss

    # -- phase 1: a quiet agent ----------------------------------------------------

    async def quiet(self) -> dict[str, Any]:
        args = self.args
        agent = await self.start_agent("quiet", QUIET_TTL)
        try:
            await asyncio.sleep(args.settle)
            rss = agent.rss()
            before = await agent.metrics()
            cpu0, t0 = agent.cpu(), time.monotonic()
            await asyncio.sleep(args.idle_window)
            cpu1, t1 = agent.cpu(), time.monotonic()
            after = await agent.metrics()
            if after.get(RENEWALS) != before.get(RENEWALS):
                self.notes.append("the quiet agent renewed during its window")
            scrape0 = agent.cpu()
            for _ in range(METRIC_SCRAPES):
                await agent.metrics()
            scrape1 = agent.cpu()
        finally:
            code = await self.stop_agent(agent)
        if code not in (0, -signal.SIGTERM):
            self.notes.append(f"quiet agent exited with status {code} on SIGTERM")
        self.log_problems(agent, "quiet")
        return {
            "rss": rss,
            "cpu_ms": round((cpu1 - cpu0) * 1000),
            "seconds": round(t1 - t0, 1),
            "per_minute_ms": (cpu1 - cpu0) * 1000 * 60 / (t1 - t0),
            "scrape_ms": (scrape1 - scrape0) * 1000 / METRIC_SCRAPES,
        }

    # -- phase 2: the main agent ---------------------------------------------------

    async def consistent_version(
        self, agent: Agent, clients: Sequence[EnvoySdsClient]
    ) -> tuple[int, float]:
        """The SDS version every stream holds, and the agent's renewal count with it."""
        for _ in range(5):
            metrics = await agent.metrics()
            versions = {c.received[-1].version for c in clients if c.received}
            renewals = metrics.get(RENEWALS, 0.0)
            if len(versions) == 1:
                (version,) = versions
                if version.isdigit() and int(version) == int(renewals):
                    return int(version), renewals
            await asyncio.sleep(0.5)
        raise BenchError(
            f"SDS streams hold versions {sorted(versions)} while the agent counts "
            f"{renewals:g} renewals; they should agree between rotations"
        )

    async def main_agent(self, stack: contextlib.AsyncExitStack) -> dict[str, Any]:
        args = self.args
        agent = await self.start_agent("main", self.ttl)
        stack.push_async_callback(self._finish_main, agent)
        sampler = asyncio.create_task(self.sample_rss(agent))
        stack.callback(sampler.cancel)

        # Idle: no clients, renewals every ~ttl/2.
        await asyncio.sleep(args.settle)
        idle0 = await agent.metrics()
        cpu0, t0 = agent.cpu(), time.monotonic()
        await asyncio.sleep(args.idle_window)
        cpu1, t1 = agent.cpu(), time.monotonic()
        idle1 = await agent.metrics()
        rss_idle = agent.rss()
        idle_renewals = int(idle1.get(RENEWALS, 0) - idle0.get(RENEWALS, 0))
        say(f"idle: RSS {rss_idle / MIB:.1f} MiB, {idle_renewals} renewals in {t1 - t0:.1f}s")

        # Clients: SDS streams in this process, py-spiffe in a subprocess.
        sds_path = Path(agent.argv[agent.argv.index("--sds-socket") + 1])
        wl_path = Path(agent.argv[agent.argv.index("--workload-api-socket") + 1])
        clients = [
            EnvoySdsClient(
                sds_path, node_id=f"sidecar~10.0.{i // 250}.{i % 250}~bench-{i}.default~cluster"
            )
            for i in range(args.streams)
        ]
        stack.push_async_callback(self._close_clients, clients)
        async with asyncio.timeout(START_TIMEOUT):
            await asyncio.gather(*(c.open() for c in clients))
            await all_streams_hold(clients, 1, START_TIMEOUT)
        budget = args.rotations * args.ttl + 2 * START_TIMEOUT
        with (self.tmp / "wlapi.err").open("wb") as err:
            proc = self.children.start(
                [sys.executable, str(WLAPI_CLIENT), str(wl_path), f"{budget:.0f}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=PROJECT_ROOT,
            )
        wlapi = WlapiWatcher(proc)
        stack.callback(wlapi.stop)
        if not await wlapi.wait(lambda: wlapi.ready_serial is not None, START_TIMEOUT):
            raise BenchError(
                f"py-spiffe client not ready: {wlapi.errors or tail(self.tmp / 'wlapi.err')}"
            )
        await asyncio.sleep(args.settle)
        rss_streams = agent.rss()
        say(f"{len(clients)} SDS streams + py-spiffe: RSS {rss_streams / MIB:.1f} MiB")

        # Rotations.
        version, renewals_start = await self.consistent_version(agent, clients)
        bench_cpu0, wl_cpu0 = cpu_seconds([os.getpid()]), cpu_seconds([proc.pid])
        busy0 = machine_busy_seconds()
        cpu_a, t_a = agent.cpu(), time.monotonic()
        renewals_end = renewals_start
        rotations: list[Rotation] = []
        wait = args.ttl + 15.0  # a renewal is due every ~ttl/2; room for one retry
        for _ in range(args.rotations):
            target = version + 1
            try:
                await all_streams_hold(clients, target, wait)
            except TimeoutError:
                behind = sum(first_arrival(c, target) is None for c in clients)
                self.notes.append(
                    f"version {target} did not reach {behind} SDS stream(s) in {wait:g}s; "
                    "stopped timing rotations there"
                )
                break
            rotation = await self._observe(agent, clients, wlapi, target)
            rotations.append(rotation)
            renewals_end = float(rotation.version)
            version = max(int(c.received[-1].version) for c in clients)
            for c in clients:  # keep memory flat on long runs
                del c.received[:-1]
        cpu_b, t_b = agent.cpu(), time.monotonic()
        busy1 = machine_busy_seconds()
        bench_cpu1, wl_cpu1 = cpu_seconds([os.getpid()]), cpu_seconds([proc.pid])
        rss_after = agent.rss()
        final = await agent.metrics()
        renewals_window = int(renewals_end - renewals_start)
        if final.get(RENEWALS, 0) > renewals_end:
            self.notes.append("a renewal began as the window closed: its CPU may be counted")
        await self._ledger_times(rotations)
        window = t_b - t_a
        ours = (cpu_b - cpu_a) + (bench_cpu1 - bench_cpu0) + (wl_cpu1 - wl_cpu0)
        return {
            "agent_command": shlex.join([Path(agent.argv[0]).name, *agent.argv[1:]]),
            "rss": {"idle": rss_idle, "with_streams": rss_streams, "after": rss_after},
            "idle": {
                "cpu_ms": (cpu1 - cpu0) * 1000,
                "seconds": t1 - t0,
                "renewals": idle_renewals,
            },
            "window": {
                "cpu_ms": (cpu_b - cpu_a) * 1000,
                "seconds": window,
                "renewals": renewals_window,
                "bench_cores": (bench_cpu1 - bench_cpu0) / window if window else 0.0,
                "wlapi_cores": (wl_cpu1 - wl_cpu0) / window if window else 0.0,
                "other_cores": max(0.0, busy1 - busy0 - ours) / window if window else 0.0,
            },
            "rotations": rotations,
            "wlapi_errors": wlapi.errors,
        }

    async def _observe(
        self,
        agent: Agent,
        clients: Sequence[EnvoySdsClient],
        wlapi: WlapiWatcher,
        target: int,
    ) -> Rotation:
        """One rotation, once every SDS stream holds ``target``: arrivals, then a scrape."""
        arrivals = [first_arrival(c, target) for c in clients]
        got = [a for a in arrivals if a is not None]
        coalesced = sum(a.version != str(target) for a in got)
        if coalesced:
            self.notes.append(f"{coalesced} stream(s) skipped version {target} (coalesced)")
        leaf = got[0].chain()[0]
        serial = format(leaf.serial_number, "x")
        await wlapi.wait(lambda: serial in wlapi.updates, WLAPI_GRACE)
        metrics = await agent.metrics()
        # Received.at is time.perf_counter() (CLOCK_MONOTONIC); the agent and py-spiffe
        # report time.time(). The offset between the two clocks, taken now, converts.
        offset = time.time() - time.perf_counter()
        renewed = None
        if int(metrics.get(RENEWALS, 0)) == target:
            renewed = metrics.get(LAST_RENEWAL)
        else:
            self.notes.append(
                f"the scrape after version {target} saw renewal "
                f"{metrics.get(RENEWALS, 0):g}: rotation left out of the latencies"
            )
        return Rotation(
            version=target,
            serial=serial,
            leaf_pem=leaf.public_bytes(serialization.Encoding.PEM).decode(),
            renewed_at=renewed,
            sds=[a.at + offset for a in got if a.version == str(target)],
            wlapi=wlapi.updates.get(serial),
        )

    async def _ledger_times(self, rotations: Sequence[Rotation]) -> None:
        assert self.ca is not None
        store = self.ca.store
        for rotation in rotations:
            row = await asyncio.to_thread(
                store.issued_certificate, rotation.serial, rotation.leaf_pem
            )
            if row is not None:
                rotation.issued_at = row.issued_at.timestamp()

    async def _close_clients(self, clients: Sequence[EnvoySdsClient]) -> None:
        async with asyncio.timeout(30):
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    async def _finish_main(self, agent: Agent) -> None:
        code = await self.stop_agent(agent)
        if code not in (0, -signal.SIGTERM):
            self.notes.append(f"main agent exited with status {code} on SIGTERM")
        self.log_problems(agent, "main")

    # -- the whole run -------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        args = self.args
        facts = machine_facts(PROJECT_ROOT, None)
        facts.pop("cfssl", None)
        facts["loadavg_before"] = loadavg()
        async with contextlib.AsyncExitStack() as stack:
            self.session = await stack.enter_async_context(aiohttp.ClientSession())
            kube = await stack.enter_async_context(FakeKubeApi())
            self.ca = await self.start_ca(kube)
            stack.push_async_callback(self.ca.stop, 0)
            self.floor_rss = await self.floor() if args.floor else None
            quiet = None if args.skip_quiet else await self.quiet()
            main = await self.main_agent(stack)
        facts["loadavg_after"] = loadavg()
        return self.report(facts, quiet, main)

    def report(
        self, facts: dict[str, Any], quiet: dict[str, Any] | None, main: dict[str, Any]
    ) -> dict[str, Any]:
        args = self.args
        rotations: list[Rotation] = main["rotations"]
        timed = [r for r in rotations if r.renewed_at is not None]
        renewed = sorted(r.renewed_at for r in timed if r.renewed_at is not None)
        interval = (renewed[-1] - renewed[0]) / (len(renewed) - 1) if len(renewed) > 1 else None
        missed = sum(r.wlapi is None for r in rotations)
        if missed:
            self.notes.append(f"py-spiffe did not report {missed} rotation(s) in time")
        for error in main["wlapi_errors"]:
            self.notes.append(f"py-spiffe client: {error}")
        if len(timed) <= 100:
            self.notes.append(
                f"{len(timed)} rotations timed: a nearest-rank p99 of 100 or fewer values is "
                "their max; use --rotations 200 or more for a p99 of its own"
            )
        if main["window"]["other_cores"] > 0.2:
            self.notes.append(
                f"other processes used {main['window']['other_cores']:.2f} cores during the "
                "window: the machine was shared; latencies and CPU per renewal may be inflated"
            )
        cpus = facts.get("cpus_usable") or facts.get("nproc") or 0
        if cpus and cpus < 4:
            self.notes.append(
                f"only {cpus} CPUs: the agent, the CA, the SDS clients and py-spiffe share "
                "them, and a push to many streams waits for the clients to read"
            )
        idle, window = main["idle"], main["window"]
        cpu = {
            "tick_ms": 1000 / CLOCK_TICKS,
            "window_cpu_ms": window["cpu_ms"],
            "window_s": window["seconds"],
            "window_renewals": window["renewals"],
            "per_renewal_ms": window["cpu_ms"] / window["renewals"] if window["renewals"] else None,
            "metrics_scrape_ms": quiet["scrape_ms"] if quiet else None,
            "idle_cpu_ms": idle["cpu_ms"],
            "idle_s": idle["seconds"],
            "idle_renewals": idle["renewals"],
            "idle_per_renewal_ms": idle["cpu_ms"] / idle["renewals"] if idle["renewals"] else None,
            "idle_per_minute_ms": idle["cpu_ms"] * 60 / idle["seconds"],
            "quiet_cpu_ms": quiet["cpu_ms"] if quiet else None,
            "quiet_s": quiet["seconds"] if quiet else None,
            "quiet_per_minute_ms": quiet["per_minute_ms"] if quiet else None,
            "bench_cores": window["bench_cores"],
            "wlapi_cores": window["wlapi_cores"],
            "other_cores": window["other_cores"],
        }
        rss = main["rss"]
        report: dict[str, Any] = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": facts,
            "settings": {
                "ttl": format_duration(self.ttl),
                "ca_max_ttl": format_duration(self.ca_max_ttl),
                "quiet_ttl": None if args.skip_quiet else format_duration(QUIET_TTL),
                "renewal": "half life, +/- 5% jitter (agent defaults)",
                "renewal_every_s": interval if interval is not None else args.ttl / 2,
                "streams": args.streams,
                "rotations": args.rotations,
                "settle_s": args.settle,
                "idle_window_s": args.idle_window,
            },
            "agent_command": main["agent_command"],
            "rss_mib": {
                "quiet": quiet["rss"] / MIB if quiet else None,
                "idle": rss["idle"] / MIB,
                "with_streams": rss["with_streams"] / MIB,
                "after_rotations": rss["after"] / MIB,
                "peak": self.peak_rss / MIB,
                "floor": self.floor_rss / MIB if self.floor_rss is not None else None,
            },
            "latency_ms": {k: asdict(v) for k, v in latencies(rotations).items()},
            "rotations_observed": len(rotations),
            "rotations_timed": len(timed),
            "renewal_interval_s": interval,
            "cpu": cpu,
            "notes": self.notes,
        }
        report["text"] = render(report)
        return report


async def amain(args: argparse.Namespace, tmp: Path, children: Children) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, task.cancel)
    return await Bench(args, tmp, children).run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    children = Children()
    # Short: Unix socket paths must fit in 107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="meshca-agent-bench-"))
    report: dict[str, Any] | None = None
    try:
        report = asyncio.run(amain(args, tmp, children))
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted; stopping everything")
        return 130
    except (BenchError, RuntimeError, OSError, TimeoutError) as exc:
        say(f"failed: {type(exc).__name__}: {exc}")
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
        print(json.dumps(report, default=str), flush=True)
    else:
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
