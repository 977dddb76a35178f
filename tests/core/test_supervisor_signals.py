"""The supervisor starts its children (the one that prepares the state, the workers) with
SIGINT blocked, so a Ctrl-C landing while a child starts neither interrupts the child's
imports nor gets lost: it waits for the supervisor's own handler."""

from __future__ import annotations

import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# In a fresh interpreter, so that this start is the first (multiprocessing starts its
# resource tracker then, and unblocks SIGINT on its way out of doing so).
PROBE = """
import multiprocessing, signal
from meshca.supervisor import Supervisor
from tests.core.test_supervisor_signals import report_sigint

context = multiprocessing.get_context("spawn")
parent, child = context.Pipe(duplex=False)
process = context.Process(target=report_sigint, args=(child,))
Supervisor._start(process)
mine = signal.pthread_sigmask(signal.SIG_BLOCK, set())
handler = signal.getsignal(signal.SIGINT)
print(parent.recv(), signal.SIGINT in mine, handler is signal.default_int_handler)
process.join()
"""


def report_sigint(conn: Connection) -> None:
    """In the child, first thing: is SIGINT blocked?"""
    status = Path("/proc/self/status").read_text()
    blocked = int(
        next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16
    )
    conn.send("blocked" if blocked & (1 << 1) else "open")


def test_the_first_child_starts_with_sigint_blocked_and_the_supervisor_keeps_its_handler() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    # The child: blocked. The supervisor afterwards: SIGINT not blocked, handler unchanged.
    assert done.stdout.split() == ["blocked", "False", "True"]


# A Ctrl-C while start() runs: the start completes, then the supervisor's handler gets it.
LATE = """
import os, signal, threading, time
from meshca.supervisor import Supervisor

class Child:
    started = False
    def start(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # a thread that does not block SIGINT may take it meanwhile
        Child.started = True

# A thread of the supervisor's (its logging) with SIGINT open.
threading.Thread(target=time.sleep, args=(2,), daemon=True).start()
try:
    Supervisor._start(Child())
except KeyboardInterrupt:
    print("interrupted after the start" if Child.started else "interrupted during the start")
else:
    print("the interrupt was lost")
"""


def test_a_ctrl_c_during_a_start_reaches_the_supervisor_once_the_child_is_started() -> None:
    done = subprocess.run(
        [sys.executable, "-c", LATE], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "interrupted after the start"
