"""Closed-loop load generator, run as its own process by the benchmark drivers.

``python bench/_loadgen.py SPEC.json``. The spec names the protocol (``grpc``: Istio's
``IstioCertificateService/CreateCertificate`` over TLS; ``http``: cfssl's
``POST /api/v1/cfssl/sign``), the target, the identity pool and the load shape.

Handshake on stdin/stdout, one line each, so several generators start together:
it prints ``READY`` once its connections are up, then waits for ``GO <epoch>``
(wall-clock seconds); load starts at ``<epoch>``, the measurement window opens
``warmup`` seconds later and lasts ``duration`` seconds. ``concurrency`` coroutines
each keep one request in flight, spread round-robin over ``connections`` gRPC
channels (each with its own subchannel, hence its own TCP connection) or an aiohttp
pool of that many connections (HTTP/1.1: one request in flight per connection; the
others wait their turn in FIFO order, and that wait is part of their latency). A
request counts when it completes inside the window.

It writes a JSON result to ``result_path`` and the window's latencies (float64
seconds, native byte order) to ``latency_path``. Every loop is bounded by the window,
by ``max_requests`` per coroutine and by a per-request timeout; the whole run by a
watchdog.
"""

from __future__ import annotations

import array
import asyncio
import json
import resource
import ssl
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_REQUESTS_PER_WORKER = 10_000_000
GO_TIMEOUT = 120.0
"""Seconds to wait for ``GO`` after ``READY``."""

# One call: returns (error code or None, a sample of the answer or None).
Call = Callable[[int], Awaitable[tuple[str | None, Any]]]


@dataclass
class Tally:
    """What the generator saw; latencies only for requests completed in the window."""

    window_start: float  # perf_counter
    window_end: float
    sample_limit: int
    latencies: array.array[float] = field(default_factory=lambda: array.array("d"))
    errors: Counter[str] = field(default_factory=Counter)
    errors_outside: Counter[str] = field(default_factory=Counter)
    ok: int = 0
    requests: int = 0
    samples: list[Any] = field(default_factory=list)

    def record(self, started: float, ended: float, error: str | None, sample: Any) -> None:
        self.requests += 1
        if not self.window_start <= ended <= self.window_end:
            if error is not None:
                self.errors_outside[error] += 1
            return
        self.latencies.append(ended - started)
        if error is not None:
            self.errors[error] += 1
            return
        self.ok += 1
        if sample is not None and len(self.samples) < self.sample_limit:
            self.samples.append(sample)


async def _worker(call: Call, first: int, step: int, tally: Tally) -> None:
    index = first
    for _ in range(MAX_REQUESTS_PER_WORKER):
        started = time.perf_counter()
        if started >= tally.window_end:
            return
        error, sample = await call(index)
        tally.record(started, time.perf_counter(), error, sample)
        index += step


class FairSlots:
    """A FIFO semaphore: a released slot goes to the longest waiter, never to a barger.

    aiohttp's own pool limit lets the coroutine that just released a connection take it
    straight back, so with more coroutines than connections some starve until their
    timeout; queueing here first keeps the closed loop honest.
    """

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot while being cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


async def _grpc_calls(spec: dict[str, Any]) -> tuple[Call, Callable[[], Awaitable[None]], int]:
    import grpc
    from grpc import aio

    from meshca.api._proto import istioca_pb2, istioca_pb2_grpc

    credentials = grpc.ssl_channel_credentials(root_certificates=spec["root_pem"].encode())
    channels = []
    for n in range(spec["connections"]):
        options = [
            ("grpc.ssl_target_name_override", spec["server_name"]),
            # A channel per connection: without a local pool, channels with the same
            # target and arguments would share one subchannel, hence one connection.
            ("grpc.use_local_subchannel_pool", 1),
            ("meshca.bench.channel", n),
        ]
        channels.append(aio.secure_channel(spec["target"], credentials, options=options))
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), spec["timeout"])
    stubs = [istioca_pb2_grpc.IstioCertificateServiceStub(c) for c in channels]
    pool = spec["pool"]
    requests = [
        istioca_pb2.IstioCertificateRequest(csr=item["csr_pem"], validity_duration=3600)
        for item in pool
    ]
    metadata = [
        (("authorization", f"Bearer {item['token']}"), ("clusterid", spec["cluster_id"]))
        for item in pool
    ]
    timeout = spec["timeout"]
    counter = [0]

    async def call(index: int) -> tuple[str | None, Any]:
        slot = index % len(pool)
        stub = stubs[counter[0] % len(stubs)]
        counter[0] += 1
        try:
            answer = await stub.CreateCertificate(
                requests[slot], metadata=metadata[slot], timeout=timeout
            )
        except aio.AioRpcError as exc:
            return exc.code().name, None
        chain = list(answer.cert_chain)
        if len(chain) < 2 or not chain[0].startswith("-----BEGIN CERTIFICATE-----"):
            return "BAD_RESPONSE", None
        return None, {"spiffe_id": pool[slot]["spiffe_id"], "chain": chain}

    async def close() -> None:
        for channel in channels:
            await channel.close()

    return call, close, len(channels)


async def _http_calls(spec: dict[str, Any]) -> tuple[Call, Callable[[], Awaitable[None]], int]:
    import aiohttp

    context: ssl.SSLContext | bool = False
    if spec.get("ca_file"):
        context = ssl.create_default_context(cafile=spec["ca_file"])
    connector = aiohttp.TCPConnector(
        limit=spec["connections"], limit_per_host=spec["connections"], ssl=context
    )
    session = aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=spec["timeout"])
    )
    pool = spec["pool"]
    bodies = [json.dumps({"certificate_request": item["csr_pem"]}).encode() for item in pool]
    headers = {"Content-Type": "application/json"}
    url = spec["target"]
    slots = FairSlots(spec["connections"])

    async def call(index: int) -> tuple[str | None, Any]:
        slot = index % len(pool)
        await slots.acquire()
        try:
            async with session.post(url, data=bodies[slot], headers=headers) as response:
                raw = await response.read()
                if response.status != 200:
                    return f"HTTP_{response.status}", None
        except TimeoutError:
            return "TIMEOUT", None
        except aiohttp.ClientError as exc:
            return type(exc).__name__, None
        finally:
            slots.release()
        try:
            answer = json.loads(raw)
            certificate = answer["result"]["certificate"]
        except (ValueError, KeyError, TypeError):
            return "BAD_RESPONSE", None
        if not answer.get("success") or not certificate.startswith("-----BEGIN CERTIFICATE"):
            return "BAD_RESPONSE", None
        return None, {"spiffe_id": pool[slot]["spiffe_id"], "chain": [certificate]}

    return call, session.close, spec["connections"]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _cpu_at(when: float, into: list[float]) -> None:
    await asyncio.sleep(max(0.0, when - time.perf_counter()))
    into.append(_cpu())


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["mode"] == "grpc":
        call, close, connections = await _grpc_calls(spec)
    else:
        call, close, connections = await _http_calls(spec)
    try:
        print(f"READY {connections}", flush=True)
        loop = asyncio.get_running_loop()
        line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), GO_TIMEOUT)
        word, _, epoch = line.strip().partition(" ")
        if word != "GO":
            raise SystemExit(f"expected 'GO <epoch>', got {line!r}")
        # Map the shared wall-clock start onto this process's monotonic clock.
        start = float(epoch) - time.time() + time.perf_counter()
        window_start = start + spec["warmup"]
        window_end = window_start + spec["duration"]
        tally = Tally(window_start, window_end, spec["samples"])
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        cpu: list[float] = []
        concurrency, offset = spec["concurrency"], spec["pool_offset"]
        workers = [_worker(call, offset + i, concurrency, tally) for i in range(concurrency)]
        bound = spec["warmup"] + spec["duration"] + spec["timeout"] + 10
        await asyncio.wait_for(
            asyncio.gather(_cpu_at(window_start, cpu), _cpu_at(window_end, cpu), *workers),
            bound,
        )
    finally:
        await close()
    Path(spec["latency_path"]).write_bytes(tally.latencies.tobytes())
    return {
        "ok": tally.ok,
        "errors": dict(tally.errors),
        "errors_outside_window": dict(tally.errors_outside),
        "requests_total": tally.requests,
        "latencies": len(tally.latencies),
        "cpu_seconds": cpu[1] - cpu[0] if len(cpu) == 2 else None,
        "connections": connections,
        "samples": tally.samples,
    }


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2:
        print("usage: _loadgen.py SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    sys.path.insert(0, spec["project_root"])
    result = asyncio.run(run(spec))
    Path(spec["result_path"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
