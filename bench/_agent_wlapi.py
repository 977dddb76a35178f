"""A py-spiffe Workload API client for bench/agent.py, run as a subprocess of it.

py-spiffe's generated protobuf code clashes with meshca's (the Workload API contract has
no proto package), so it cannot share a process with the benchmark, which imports meshca.
This script imports ``spiffe`` only, never ``meshca``.

    _agent_wlapi.py SOCKET MAX_SECONDS

Opens an ``X509Source`` on ``unix://SOCKET`` and prints one JSON line per X509-SVID it
receives, the first ``{"event": "ready", ...}``, then ``{"event": "update", ...}`` per
rotation, each with the leaf's serial (hex) and ``at``, the ``time.time()`` at which the
source handed the update to its subscribers (what an application using py-spiffe sees).
Exits when stdin closes or after MAX_SECONDS. On failure prints ``{"error": ...}`` and
exits with status 2.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from spiffe import X509Source

START_TIMEOUT = 30.0
_OUT = threading.Lock()


def emit(event: dict[str, object]) -> None:
    """One line per event; the watcher thread and the main thread both write."""
    with _OUT:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def watch(socket: str, max_seconds: float) -> int:
    source = X509Source(socket_path=socket, timeout_in_seconds=START_TIMEOUT)
    try:

        def on_update() -> None:
            at = time.time()
            serial = format(source.get_x509_context().default_svid.leaf.serial_number, "x")
            emit({"event": "update", "serial": serial, "at": at})

        source.subscribe_for_updates(on_update)
        leaf = source.get_x509_context().default_svid.leaf
        emit({"event": "ready", "serial": format(leaf.serial_number, "x")})
        stdin_closed = threading.Event()

        def wait_for_eof() -> None:
            sys.stdin.read()
            stdin_closed.set()

        threading.Thread(target=wait_for_eof, daemon=True).start()
        stdin_closed.wait(max_seconds)
    finally:
        source.close()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        return watch(f"unix://{argv[1]}", float(argv[2]))
    except Exception as exc:  # the benchmark reads the reason from stdout
        emit({"error": f"{type(exc).__name__}: {exc}"})
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
