"""Wait until the test has written this process's /proc fixtures, then exec a program.

    exec_when_placed.py PROC_ROOT TIMEOUT PROGRAM [ARG...]

A node agent in a test reads ``<PROC_ROOT>/<pid>/cgroup`` (and ``exe``) for the pid the
kernel reports for a connection (``SO_PEERCRED``). The test learns the pid only once the
process exists; this script waits for ``<PROC_ROOT>/<its pid>/placed`` (written last)
and then ``execv``s PROGRAM with this interpreter, which keeps the pid, so the process
that connects is the one the fixtures describe. Exits 3 if nothing is written in time.
"""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str]) -> int:
    proc_root, timeout, program = argv[1], float(argv[2]), argv[3:]
    marker = os.path.join(proc_root, str(os.getpid()), "placed")
    deadline = time.monotonic() + timeout
    while not os.path.exists(marker):
        if time.monotonic() > deadline:
            print('{"error": "the test wrote no fixtures for this process"}', flush=True)
            return 3
        time.sleep(0.01)
    os.execv(sys.executable, [sys.executable, *program])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
