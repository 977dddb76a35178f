"""Summarise a py-spy raw profile (``--format raw --threads --idle``) of meshca.

Each raw line is ``process P:"cmd";thread (TID): NAME;frame;...;frame COUNT``, frames
root first, each ``function (file:line)``. Samples are grouped by thread role (the
asyncio event loop, the ``asyncio.to_thread`` executor, gRPC's poller, short-lived
threads), then each busy sample is put in one cost category by walking its stack from
the leaf up to the first frame that a rule recognises. With ``--idle`` every thread is
sampled whether it runs or waits, so figures are wall-clock thread time: time blocked
in fsync shows up (as COMMIT), and so does time waiting for the GIL.

Also a script: ``python bench/_profile.py RAW [--rate 200] [--certs N] [--seconds S]``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_PY_FRAME = re.compile(r"\((?:[^()]*\.py|<[^<>]*>):\d+\)$")
_THREAD = re.compile(r"thread \((?P<tid>0x[0-9A-Fa-f]+|\d+)\)(?:: (?P<name>.*))?")

# Leaf frames of a thread that is waiting for work, not working.
_IDLE_LEAVES = (
    "EpollSelector.select (selectors.py",
    "_worker (concurrent/futures/thread.py",
    "Condition.wait (threading.py",
    "Event.wait (threading.py",
)

# Event-loop thread: (category, substrings any of which marks a frame as that category).
_LOOP_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("token verification (PyJWT RS256, claims)", ("jwt/", "meshca/authn/")),
    ("CSR parse + checks (signature, SANs)", ("meshca/pki/csr.py",)),
    ("certificate build + ECDSA sign", ("meshca/pki/profile.py", "cryptography/x509/base.py")),
    ("ledger (queueing on the loop)", ("meshca/ca/ledger.py", "meshca/store/", "sqlalchemy/")),
    ("admission (rate limits)", ("limits/", "meshca/api/admission.py")),
    ("logging", ("logging/",)),
    ("metrics", ("prometheus_client/", "meshca/metrics.py")),
    ("authority (PEM, ledger entry, other)", ("meshca/ca/",)),
    ("gRPC servicer glue (meshca/api/grpc.py)", ("meshca/api/grpc.py",)),
    ("gRPC runtime (grpc.aio Python/Cython)", ("grpc/", "grpc_health/")),
    (
        "asyncio / thread hand-off",
        ("asyncio/", "concurrent/futures/", "threading.py", "contextvars"),
    ),
)

_NATIVE_CALLBACK = "Handle._run (asyncio/events.py"
"""A loop callback whose leaf is Handle._run is running native code: gRPC's Cython
completion-queue callbacks (HTTP/2 framing, TLS, protobuf) are invisible to py-spy
without --native."""

_EXECUTOR_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("COMMIT (SQLite WAL write + fsync)", ("do_commit (",)),
    ("pool pre-ping (SELECT 1 on checkout)", ("do_ping (",)),
    ("hash chain (row_hash)", ("meshca/store/chain.py",)),
    ("root signer", ("meshca/signers/",)),
)


@dataclass
class ThreadGroup:
    threads: set[str] = field(default_factory=set)
    samples: int = 0
    idle: int = 0
    categories: Counter[str] = field(default_factory=Counter)
    leaves: Counter[str] = field(default_factory=Counter)


def _name(frame: str) -> str:
    return frame.split(" (", 1)[0]


def _loop_category(frames: Sequence[str]) -> str:
    if frames[-1].startswith(_NATIVE_CALLBACK):
        return "native callbacks (gRPC core: HTTP/2, TLS, protobuf)"
    for frame in reversed(frames):
        for category, marks in _LOOP_RULES:
            if any(mark in frame for mark in marks):
                return category
    return "other"


def _executor_category(frames: Sequence[str]) -> str:
    leaf = frames[-1]
    for category, marks in _EXECUTOR_RULES:
        if any(mark in f for f in frames for mark in marks):
            return category
    if leaf.startswith(("DefaultDialect.do_execute (", "DefaultDialect.do_executemany (")):
        if any("_connection_for_bind" in f for f in frames) and not any(
            "orm_execute_statement" in f or "_execute_context" in f for f in frames[:-3]
        ):
            return "BEGIN IMMEDIATE (waiting for the write lock)"
        return "SQL statements in SQLite (SELECT ... FOR UPDATE, INSERT, UPDATE)"
    if any(m in f for f in frames for m in ("sqlalchemy/", "sqlmodel/", "pydantic/")):
        return "ORM overhead (SQLAlchemy / SQLModel objects)"
    return "other"


def _role(thread_name: str, frames: Sequence[str], is_loop: bool) -> str:
    if thread_name == "MainThread":
        # Not every sample holds the whole stack (--nonblocking), so a thread is an event
        # loop when any of its samples shows run_forever; other main threads belong to
        # meshca's worker supervisor or to multiprocessing's helpers.
        return "event loop" if is_loop else "supervisor"
    if thread_name.startswith("asyncio_"):
        return "executor"
    if "_poll_wrapper" in thread_name:
        return "grpc poller"
    if any("limits/" in f for f in frames) or re.fullmatch(r"Thread-\d+", thread_name):
        return "short-lived"
    return "other"


def _records(text: str) -> list[tuple[str, str, list[str], int]]:
    """(thread key, thread name, Python frames root first, sample count) per raw line."""
    records = []
    for line in text.splitlines()[:1_000_000]:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        parts = stack.split(";")
        # With --subprocesses, one "process P:..." part per ancestor, then the thread.
        at = next((i for i, p in enumerate(parts) if p.startswith("thread (")), None)
        if at is None or at == 0:
            continue
        match = _THREAD.match(parts[at])
        if match is None:
            continue
        thread = f"{parts[at - 1].split(':', 1)[0]}/{match['tid']}"
        # Native frames (--native) are dropped: rules and idle detection use Python frames.
        frames = [f for f in parts[at + 1 :] if _PY_FRAME.search(f)] or ["(no Python frame)"]
        records.append((thread, match["name"] or "", frames, int(count_text)))
    return records


def parse(text: str) -> dict[str, ThreadGroup]:
    records = _records(text)
    loops = {
        thread
        for thread, _, frames, _ in records
        if any(f.startswith("BaseEventLoop.run_forever (") for f in frames)
    }
    groups: dict[str, ThreadGroup] = {}
    for thread, name, frames, count in records:
        role = _role(name, frames, thread in loops)
        group = groups.setdefault(role, ThreadGroup())
        group.threads.add(thread)
        group.samples += count
        leaf = frames[-1]
        if leaf.startswith(_IDLE_LEAVES) or role in ("grpc poller", "short-lived", "supervisor"):
            group.idle += count
            continue
        if role == "event loop":
            group.categories[_loop_category(frames)] += count
        elif role == "executor":
            group.categories[_executor_category(frames)] += count
        group.leaves[_name(leaf)] += count
    return groups


def summarise_raw(text: str, *, rate: float, seconds: float, certs: int) -> str:
    """A few lines saying where meshca's threads spent the window."""
    groups = parse(text)
    if not groups:
        return "py-spy profile: no samples"
    per_thread = rate * seconds

    def ms_per_cert(samples: int) -> str:
        return f"{samples / rate * 1000 / certs:6.2f} ms/cert" if certs else ""

    lines = [
        f"py-spy profile of meshca ({seconds:g}s window, {rate:g} Hz, wall-clock thread "
        f"time incl. waits; {certs} certificates):"
    ]
    loop = groups.get("event loop")
    if loop is not None:
        busy = loop.samples - loop.idle
        share = busy / loop.samples if loop.samples else 0
        lines.append(
            f"  event-loop thread(s) x{len(loop.threads)}: busy {share:.0%} of the time "
            f"({ms_per_cert(busy).strip()})"
        )
        for category, n in loop.categories.most_common():
            lines.append(f"    {n / loop.samples:5.1%}  {ms_per_cert(n)}  {category}")
        top = ", ".join(f"{name} {n / loop.samples:.1%}" for name, n in loop.leaves.most_common(8))
        lines.append(f"    hottest leaf frames: {top}")
    pool = groups.get("executor")
    if pool is not None:
        busy = pool.samples - pool.idle
        lines.append(
            f"  asyncio.to_thread executor: {len(pool.threads)} threads, "
            f"{busy / per_thread:.2f} busy on average ({ms_per_cert(busy).strip()})"
        )
        for category, n in pool.categories.most_common():
            lines.append(f"    {n / per_thread:5.2f} thr  {ms_per_cert(n)}  {category}")
    supervisor = groups.get("supervisor")
    if supervisor is not None:
        lines.append(
            f"  supervisor + helper processes: {len(supervisor.threads)} main thread(s), "
            "waiting on the workers (not counted as busy)"
        )
    poller = groups.get("grpc poller")
    if poller is not None:
        lines.append(
            f"  gRPC poller thread(s) x{len(poller.threads)}: native completion-queue "
            "polling (use --py-spy-native to see inside)"
        )
    short = groups.get("short-lived")
    if short is not None:
        lines.append(
            f"  short-lived threads: {len(short.threads)} seen in the window "
            f"({len(short.threads) / seconds:.0f}/s)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--certs", type=int, default=0)
    args = parser.parse_args(argv)
    print(
        summarise_raw(args.raw.read_text(), rate=args.rate, seconds=args.seconds, certs=args.certs)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
