"""``meshca server --workers N``: N serving processes sharing the CA's ports.

The supervisor (the process the operator started) first claims the listening ports for
itself alone (:mod:`meshca.ports`: a port given as 0 becomes a concrete port; a port that
another process holds, meshca or not, is refused, naming it). It then prepares what must
happen once: the database migrations and the root (created on first start with the file
signer), in a short-lived child process, so the supervisor never loads the CA's own
modules (it stays at about 50 MiB instead of the 110 of a worker). It starts the workers,
prints one ready line when all are serving, restarts a worker that dies (with backoff),
and on SIGINT/SIGTERM stops them all gracefully. Each worker is a full CA process: its
own issuing intermediate, its own overload limits, the one shared ledger. Metrics are
aggregated across workers through prometheus-client's multiprocess mode, in a temporary
directory named after the supervisor's pid.

Workers die with their supervisor, whatever killed it: a worker that outlived it would
keep serving the old configuration on the shared ports, beside the next supervisor's
workers. Each worker asks the kernel for SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``; the supervisor spawns every worker from its main thread, which
lives as long as the process), checks its parent is still the supervisor right after
asking (it may have died before), and also watches the pipe multiprocessing keeps to the
parent (outside Linux, and if the signal is ever lost). An orphaned worker removes the
metrics directory on its way out; directories of supervisors that died with their
workers (both killed at once) are removed by the next start.

Ctrl-C in a terminal signals the whole process group. Workers start with SIGINT blocked
(inherited, so not even their imports see it), then ignore it, and are stopped by the
supervisor with SIGTERM, so an interrupted start-up prints one line and exits with 130,
not a traceback per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from meshca.config import Settings
from meshca.errors import MeshcaError
from meshca.metrics import MULTIPROC_ENV
from meshca.ports import PortClaim, claim, split_host_port

log = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
MAX_RESTART_DELAY = 30.0
HEALTHY_AFTER_SECONDS = 60.0
LISTENERS = {"grpc_listen": "gRPC", "grpc_mtls_listen": "gRPC mTLS", "http_listen": "HTTP"}
METRICS_PREFIX = "meshca-metrics-"
PR_SET_PDEATHSIG = 1
MAX_PID = 1 << 22
"""Linux never hands out a pid above this (PID_MAX_LIMIT on 64-bit)."""


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    started: float
    ready: dict[str, Any] | None = None


def _die_with_parent(supervisor_pid: int) -> str | None:
    """Have the kernel send SIGTERM to this worker when the supervisor dies (Linux).

    Runs first thing, before logging is set up: returns the warning to log if the kernel
    refused (the parent's pipe then remains the only watch), for the caller to log later.
    """
    refused = None
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            refused = f"cannot ask for SIGTERM on supervisor exit: errno {ctypes.get_errno()}"
    if os.getppid() != supervisor_pid:  # it died before the request above took effect
        sys.exit(1)
    return refused


def _remove_metrics_if_orphaned(supervisor_pid: int) -> None:
    """An orphaned worker is among the last users of the metrics files: remove them."""
    directory = os.environ.get(MULTIPROC_ENV)
    if os.getppid() != supervisor_pid and directory:
        shutil.rmtree(directory, ignore_errors=True)


def _ignore_interrupts() -> None:
    """First thing in a child: ignore SIGINT (pending ones included), then unblock it
    (the supervisor started the child with it blocked)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _prepare_main(settings_json: str, conn: Connection, supervisor_pid: int) -> None:
    """Entry point of the process that prepares the state before any worker starts
    (migrations, the root): spawned, so the supervisor itself never loads the CA's
    modules, store and signer libraries, which it would hold for its whole life."""
    _ignore_interrupts()
    from meshca.cli.common import exit_code, setup_logging
    from meshca.server import prepare_state

    refused = _die_with_parent(supervisor_pid)
    settings = Settings.model_validate_json(settings_json)
    setup_logging(settings.log_level)
    if refused:
        log.warning("%s", refused)
    try:
        prepare_state(settings)
    except MeshcaError as exc:
        conn.send({"error": exc.message, "code": exit_code(exc)})
        return
    conn.send({"prepared": True})


def _worker_main(settings_json: str, index: int, conn: Connection, supervisor_pid: int) -> None:
    """Entry point of a worker process (spawned, so it starts clean)."""
    _ignore_interrupts()
    from meshca.cli.common import exit_code, setup_logging
    from meshca.server import start_server

    refused = _die_with_parent(supervisor_pid)
    settings = Settings.model_validate_json(settings_json)
    setup_logging(settings.log_level, background=True)
    if refused:
        log.warning("%s", refused)

    async def run() -> int:
        loop = asyncio.get_running_loop()
        parent = multiprocessing.parent_process()
        sentinel = parent.sentinel if parent is not None else None
        if sentinel is not None:
            # Readable (EOF) once the supervisor is gone: stop as PDEATHSIG would, once.
            def parent_gone() -> None:
                loop.remove_reader(sentinel)
                os.kill(os.getpid(), signal.SIGTERM)

            loop.add_reader(sentinel, parent_gone)
        try:
            running = await start_server(settings, reuse_port=True, migrate=False)
        except MeshcaError as exc:
            conn.send({"error": exc.message, "code": exit_code(exc)})
            return exit_code(exc)
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
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await running.stop()
        return 0

    try:
        sys.exit(asyncio.run(run()))
    finally:
        _remove_metrics_if_orphaned(supervisor_pid)


def sweep_metrics_dirs(parent: str | None = None) -> list[str]:
    """Remove metrics directories left by supervisors that are no longer running.

    A directory is ``meshca-metrics-<pid>-<random>``; it is removed only if it belongs to
    this user and no process ``pid`` exists (a pid reused since is left alone, safely).
    Returns the paths removed.
    """
    removed = []
    base = parent or tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            name = entry.name
            if not name.startswith(METRICS_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            pid = name[len(METRICS_PREFIX) :].split("-", 1)[0]
            # Anyone may create names here: a pid no process can have (0, beyond the
            # kernel's range, not ASCII digits) is not a supervisor's; leave it alone.
            if not (pid.isascii() and pid.isdigit() and 0 < int(pid) <= MAX_PID):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
            except PermissionError:
                continue
    return removed


def claim_listeners(settings: Settings) -> tuple[Settings, list[PortClaim]]:
    """Claim the port of every listener ``settings`` turns on (:func:`meshca.ports.claim`);
    return the settings with port 0 replaced by the port picked, and the claims to hold.
    Raises ConfigError naming the first port another process holds."""
    pinned: dict[str, Any] = {}
    claims: list[PortClaim] = []
    try:
        for name, what in LISTENERS.items():
            listen = getattr(settings, name)
            if not listen or (name == "grpc_mtls_listen" and settings.plaintext):
                continue
            host, port = split_host_port(listen, f"{name} address")
            held = claim(host, port, what)
            claims.append(held)
            pinned[name] = held.address
    except BaseException:
        for held in claims:
            held.release()
        raise
    return settings.model_copy(update=pinned), claims


class Supervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self._settings = settings
        self._count = workers
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._stop = threading.Event()
        self._claims: list[PortClaim] = []
        self._signal = signal.SIGINT.value

    def _prepare(self, settings_json: str) -> int:
        """Apply the migrations and load or create the root in a child process, before
        the workers start (they must not race on either); non-zero if that failed, its
        error printed as the CLI prints one. An interrupt here stops the child too."""
        parent, child = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_prepare_main, args=(settings_json, child, os.getpid()), name="meshca-prepare"
        )
        self._start(process)
        child.close()
        try:
            try:
                message = parent.recv()
            except EOFError:
                process.join()
                log.error("preparing the state failed (exit code %s)", process.exitcode)
                return 1
            process.join()
        finally:
            if process.is_alive():
                process.terminate()
                process.join(STOP_TIMEOUT_SECONDS)
            parent.close()
        if "error" in message:
            print(f"meshca: error: {message['error']}", file=sys.stderr, flush=True)
            return int(message["code"])
        return 0

    def _spawn(self, index: int, settings_json: str) -> _Worker:
        parent, child = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main,
            args=(settings_json, index, child, os.getpid()),
            name=f"meshca-worker-{index}",
        )
        self._start(process)
        child.close()
        return _Worker(index, process, parent, time.monotonic())

    @staticmethod
    def _start(process: BaseProcess) -> None:
        """Start a child (a worker, or the one that prepares the state) so that a Ctrl-C
        at that moment is neither lost nor seen by the child.

        The child inherits SIGINT blocked (the mask of the thread that starts it) and
        ignores it first thing (:func:`_ignore_interrupts`), so not even its imports see
        it: Ctrl-C reaches the whole process group, and the supervisor alone decides
        what it means (SIGTERM to its children). The supervisor's other threads (logging)
        may still take the signal, so for the duration of ``start()`` the Python-level
        handler only notes it, and the signal is raised again once the child is started
        and the usual handler is back. Nothing here sets SIG_IGN: that discards a SIGINT
        already pending, and the server went on starting after such a lost Ctrl-C.
        """
        # multiprocessing starts its resource tracker on the first start(), and unblocks
        # SIGINT on its way out of that: started first, outside the window.
        resource_tracker.ensure_running()
        noted: list[int] = []
        previous = signal.signal(signal.SIGINT, lambda signum, _frame: noted.append(signum))
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            signal.signal(signal.SIGINT, previous)
        if noted:
            signal.raise_signal(signal.SIGINT)

    def claim_ports(self) -> Settings:
        """Claim every listener's port for this server alone; pin port 0 to a concrete one."""
        settings, self._claims = claim_listeners(self._settings)
        return settings

    def run(self) -> int:
        """Serve until a signal; returns the process exit code."""
        try:
            settings = self.claim_ports()
            sweep_metrics_dirs()
            code = self._prepare(settings.model_dump_json())
            if code:
                return code
            with tempfile.TemporaryDirectory(prefix=f"{METRICS_PREFIX}{os.getpid()}-") as metrics:
                os.environ[MULTIPROC_ENV] = metrics
                try:
                    return self._serve(settings.model_dump_json())
                finally:
                    os.environ.pop(MULTIPROC_ENV, None)
        finally:
            for held in self._claims:
                held.release()

    def _serve(self, settings_json: str) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        try:
            for index in range(self._count):
                self._workers[index] = self._spawn(index, settings_json)
            code = self._await_ready()
            if code:
                return code
            self._announce()
            return self._watch(settings_json)
        finally:
            self._stop_all()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signal = signum
        self._stop.set()

    def _await_ready(self) -> int:
        """Wait (bounded) for every first worker's ready message; non-zero if one failed."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        for worker in self._workers.values():
            while not worker.conn.poll(0.1):
                if self._stop.is_set():
                    print("meshca: interrupted during start-up", file=sys.stderr, flush=True)
                    return 128 + self._signal
                if time.monotonic() > deadline:
                    log.error(
                        "worker %d did not become ready within %gs",
                        worker.index,
                        READY_TIMEOUT_SECONDS,
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
                print(f"meshca: error: {message['error']}", file=sys.stderr, flush=True)
                return int(message["code"])
            worker.ready = message
        return 0

    def _announce(self) -> None:
        first = next(iter(self._workers.values())).ready
        assert first is not None
        intermediates = ", ".join(
            str(w.ready["intermediate"]) for w in self._workers.values() if w.ready
        )
        line = f"{first['status']}; workers {self._count} (intermediates {intermediates})"
        print(line, flush=True)  # once, on standard output: the log would repeat it

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
