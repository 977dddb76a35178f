"""``meshca proxy --workers N``: N proxy processes sharing the listening ports.

The parent reserves every LISTEN address with SO_REUSEPORT (port 0 becomes a concrete
port) and spawns N workers that bind the same ports (the kernel spreads new connections
over them); it keeps its reservations bound but not listening (so they never take a
connection) for a restarted worker to bind again. Each worker has its own Workload API client, TLS
contexts, policy copy and access-log handle (lines are appended whole, one ``write`` each).
The parent serves /healthz, /readyz (ready once every worker holds a certificate) and
/metrics (summed over the workers through prometheus-client's multiprocess mode); it
forwards SIGHUP, restarts a worker that dies, and stops them all on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from meshca.errors import ConfigError, MeshcaError
from meshca.metrics import MULTIPROC_ENV
from meshca.proxy.config import ProxyConfig, split_host_port
from meshca.proxy.metrics import ProxyMetrics, start_http
from meshca.proxy.run import event_loop_factory, start_proxy

log = logging.getLogger(__name__)

RESTART_DELAY_SECONDS = 1.0
STOP_TIMEOUT_SECONDS = 10.0


def _reserve(listen: str) -> socket.socket:
    host, port = split_host_port(listen, "listen address")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror}") from None
    return sock


def _worker_main(config: ProxyConfig, ports: dict[str, int], conn: Connection, level: str) -> None:
    """Entry point of a worker process (spawned, so it starts clean)."""
    from meshca.cli.common import setup_logging

    setup_logging(level)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        parent = multiprocessing.parent_process()
        if parent is not None and parent.sentinel is not None:
            loop.add_reader(parent.sentinel, os.kill, os.getpid(), signal.SIGTERM)
        try:
            running = await start_proxy(config, ports=ports, serve_http=False)
        except MeshcaError as exc:
            conn.send({"error": exc.message})
            return
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, running.reopen_logs)
        conn.send({"bound": True})
        ready = asyncio.create_task(running.wait_ready())

        def report(task: asyncio.Task[None]) -> None:
            if not task.cancelled():
                conn.send({"ready": running.status_line()})

        ready.add_done_callback(report)
        try:
            await stop.wait()
        finally:
            ready.cancel()
            await running.stop()

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(run())


class _Supervisor:
    def __init__(self, config: ProxyConfig, ports: dict[str, int], level: str) -> None:
        self.config = config
        self.ports = ports
        self.level = level
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: dict[int, tuple[BaseProcess, Connection]] = {}
        self.ready: set[int] = set()
        self.stopping = False

    def start(self, index: int) -> None:
        parent_end, child_end = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=_worker_main,
            args=(self.config, self.ports, child_end, self.level),
            name=f"meshca-proxy-worker-{index}",
        )
        proc.start()
        child_end.close()
        self.workers[index] = (proc, parent_end)
        self.ready.discard(index)
        loop = asyncio.get_running_loop()
        loop.add_reader(parent_end.fileno(), self._message, index)

    def _message(self, index: int) -> None:
        _, conn = self.workers[index]
        try:
            msg: dict[str, Any] = conn.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())
            self._died(index)
            return
        if "ready" in msg:
            self.ready.add(index)
            if len(self.ready) == len(self.workers) == self.config.workers:
                print(f"{msg['ready']}; {self.config.workers} workers", flush=True)
        elif "error" in msg:
            log.error("proxy worker %d: %s", index, msg["error"])
            self.stopping = True
            os.kill(os.getpid(), signal.SIGTERM)

    def _died(self, index: int) -> None:
        proc, _ = self.workers[index]
        proc.join(0.1)
        self.ready.discard(index)
        if self.stopping:
            return
        log.error("proxy worker %d exited (%s); restarting", index, proc.exitcode)
        asyncio.get_running_loop().call_later(RESTART_DELAY_SECONDS, self._restart, index)

    def _restart(self, index: int) -> None:
        if not self.stopping:
            self.start(index)

    def not_ready(self) -> str | None:
        missing = self.config.workers - len(self.ready)
        return None if missing == 0 else f"{missing} worker(s) without a certificate yet"

    def signal_all(self, sig: int) -> None:
        for proc, _ in self.workers.values():
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, sig)

    async def stop(self) -> None:
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        for proc, _ in self.workers.values():
            await asyncio.to_thread(proc.join, STOP_TIMEOUT_SECONDS)
            if proc.is_alive():
                proc.kill()


def run_workers(config: ProxyConfig, level: str) -> None:
    """Run ``config.workers`` processes until SIGINT/SIGTERM (ConfigError at start-up)."""
    listens = [i.listen for i in config.inbound] + [o.listen for o in config.outbound]
    reserved = {listen: _reserve(listen) for listen in listens}
    ports = {listen: int(sock.getsockname()[1]) for listen, sock in reserved.items()}
    metrics_dir = tempfile.mkdtemp(prefix=f"meshca-proxy-metrics-{os.getpid()}-")
    os.environ[MULTIPROC_ENV] = metrics_dir

    async def main() -> None:
        supervisor = _Supervisor(config, ports, level)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, supervisor.signal_all, signal.SIGHUP)
        for index in range(config.workers):
            supervisor.start(index)
        runner = None
        try:
            if config.http_listen is not None:
                host, port = split_host_port(config.http_listen, "--http-listen")
                try:
                    runner, _ = await start_http(host, port, ProxyMetrics(), supervisor.not_ready)
                except OSError as exc:
                    raise ConfigError(
                        f"cannot listen for HTTP on {config.http_listen}: {exc.strerror}"
                    ) from None
            await stop.wait()
        finally:
            await supervisor.stop()
            if runner is not None:
                await runner.cleanup()

    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(main())
    finally:
        for sock in reserved.values():
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        sys.stdout.flush()
