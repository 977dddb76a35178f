"""``meshca server --workers N``: N serving processes sharing the CA's ports.

The supervisor (the process the operator started) prepares what must happen once: the
database migrations and the root (created on first start with the file signer). It then
reserves the listening ports (a port given as 0 becomes a concrete port, held with
SO_REUSEPORT until every worker has bound it), starts the workers, prints one ready line
when all are serving, restarts a worker that dies (with backoff), and on SIGINT/SIGTERM
stops them all gracefully. Each worker is a full CA process: its own issuing
intermediate, its own overload limits, the one shared ledger. Metrics are aggregated
across workers through prometheus-client's multiprocess mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from meshca.config import Settings
from meshca.errors import ConfigError, MeshcaError
from meshca.metrics import MULTIPROC_ENV

log = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
MAX_RESTART_DELAY = 30.0
HEALTHY_AFTER_SECONDS = 60.0
LISTENERS = {"grpc_listen": "gRPC", "grpc_mtls_listen": "gRPC mTLS", "http_listen": "HTTP"}


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    started: float
    ready: dict[str, Any] | None = None


def _reserve(listen: str, what: str) -> tuple[str, socket.socket]:
    """Bind ``listen`` with SO_REUSEPORT (port 0 picks one); return HOST:PORT and the socket."""
    from meshca.server import split_host_port

    host, port = split_host_port(listen, "listen address")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen for {what} on {listen}: {exc.strerror}") from exc
    bound = sock.getsockname()[1]
    return (f"[{host}]:{bound}" if family == socket.AF_INET6 else f"{host}:{bound}"), sock


def _worker_main(settings_json: str, index: int, conn: Connection) -> None:
    """Entry point of a worker process (spawned, so it starts clean)."""
    from meshca.cli.common import setup_logging
    from meshca.server import start_server

    settings = Settings.model_validate_json(settings_json)
    setup_logging(settings.log_level, background=True)

    async def run() -> int:
        try:
            running = await start_server(settings, reuse_port=True, migrate=False)
        except MeshcaError as exc:
            config_error = isinstance(exc, ConfigError)
            conn.send({"error": exc.message, "config": config_error})
            return 2 if config_error else 1
        issuing = running.authority.current_issuing_ca
        conn.send(
            {
                "grpc": running.grpc_port,
                "mtls": running.mtls_port,
                "http": running.http_port,
                "intermediate": issuing.fingerprint[:16] if issuing else "-",
                "status": running.status_line(),
            }
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await running.stop()
        return 0

    sys.exit(asyncio.run(run()))


class Supervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self._settings = settings
        self._count = workers
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._stop = threading.Event()
        self._metrics_dir: tempfile.TemporaryDirectory[str] | None = None

    def _spawn(self, index: int, settings_json: str) -> _Worker:
        parent, child = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main, args=(settings_json, index, child), name=f"meshca-worker-{index}"
        )
        process.start()
        child.close()
        return _Worker(index, process, parent, time.monotonic())

    def prepare(self) -> Settings:
        """Migrate, create or check the root, and pin every listener to a concrete port."""
        from meshca.server import prepare_state

        prepare_state(self._settings)
        reserved: dict[str, Any] = {}
        self._held: list[socket.socket] = []
        for name, what in LISTENERS.items():
            listen = getattr(self._settings, name)
            if not listen or (name == "grpc_mtls_listen" and self._settings.plaintext):
                continue
            address, sock = _reserve(listen, what)
            reserved[name] = address
            self._held.append(sock)
        return self._settings.model_copy(update=reserved)

    def run(self) -> int:
        """Serve until a signal; returns the process exit code."""
        settings = self.prepare()
        self._metrics_dir = tempfile.TemporaryDirectory(prefix="meshca-metrics-")
        os.environ[MULTIPROC_ENV] = self._metrics_dir.name
        settings_json = settings.model_dump_json()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        try:
            for index in range(self._count):
                self._workers[index] = self._spawn(index, settings_json)
            code = self._await_ready()
            if code:
                return code
            for sock in self._held:
                sock.close()
            self._announce()
            return self._watch(settings_json)
        finally:
            self._stop_all()
            self._metrics_dir.cleanup()
            os.environ.pop(MULTIPROC_ENV, None)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop.set()

    def _await_ready(self) -> int:
        """Wait (bounded) for every first worker's ready message; non-zero if one failed."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        for worker in self._workers.values():
            remaining = max(0.0, deadline - time.monotonic())
            if not worker.conn.poll(remaining):
                log.error(
                    "worker %d did not become ready within %gs", worker.index, READY_TIMEOUT_SECONDS
                )
                return 1
            try:
                message = worker.conn.recv()
            except EOFError:
                log.error(
                    "worker %d exited during start-up (code %s)",
                    worker.index,
                    worker.process.exitcode,
                )
                return 1
            if "error" in message:
                print(f"meshca: error: {message['error']}", flush=True)
                return 2 if message.get("config") else 1
            worker.ready = message
        return 0

    def _announce(self) -> None:
        first = next(iter(self._workers.values())).ready
        assert first is not None
        intermediates = ", ".join(
            str(w.ready["intermediate"]) for w in self._workers.values() if w.ready
        )
        line = f"{first['status']}; workers {self._count} (intermediates {intermediates})"
        log.info(line)
        print(line, flush=True)

    def _watch(self, settings_json: str) -> int:
        """Replace workers that die (backing off when they die young) until stopped."""
        from prometheus_client import multiprocess

        delay = 1.0
        while not self._stop.is_set():
            waitables: list[Connection | int] = [w.process.sentinel for w in self._workers.values()]
            waitables += [w.conn for w in self._workers.values()]
            multiprocessing.connection.wait(waitables, timeout=0.5)
            for index, worker in list(self._workers.items()):
                self._read_messages(worker)
                if worker.process.is_alive() or self._stop.is_set():
                    continue
                multiprocess.mark_process_dead(worker.process.pid)  # type: ignore[no-untyped-call]
                worker.conn.close()
                lived = time.monotonic() - worker.started
                delay = 1.0 if lived > HEALTHY_AFTER_SECONDS else min(delay * 2, MAX_RESTART_DELAY)
                log.error(
                    "worker %d (pid %s) exited with code %s after %.0fs; restarting in %.0fs",
                    index,
                    worker.process.pid,
                    worker.process.exitcode,
                    lived,
                    delay,
                )
                if self._stop.wait(delay):  # a signal during the back-off ends it
                    break
                self._workers[index] = self._spawn(index, settings_json)
        return 0

    @staticmethod
    def _read_messages(worker: _Worker) -> None:
        """Log what a (re)started worker reports: ready, or why it could not start."""
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if "error" in message:
                    log.error("worker %d could not start: %s", worker.index, message["error"])
                elif worker.ready is None:
                    worker.ready = message
                    log.info(
                        "worker %d serving (intermediate %s)",
                        worker.index,
                        message.get("intermediate"),
                    )
        except (EOFError, OSError):
            return

    def _stop_all(self) -> None:
        for worker in self._workers.values():
            if worker.process.is_alive() and worker.process.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for worker in self._workers.values():
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        for sock in getattr(self, "_held", []):
            sock.close()
