"""Overload control: in-flight bound, rate limits with retry hints, deadlines, size and
time limits on connections, and a burst that every client survives by retrying."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from meshca.api.grpc import CertificateFrontend
from meshca.authn.base import Peer
from meshca.metrics import CAMetrics
from tests.api.conftest import CA, StartCA
from tests.fakes.kube import FakeKubeApi
from tests.support import create_certificate, make_csr

WEB_ID = "spiffe://cluster.local/ns/default/sa/web"


def retry_delay(err: grpc.aio.AioRpcError) -> float | None:
    """The google.rpc.RetryInfo delay the server attached, in seconds."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return info.retry_delay.ToTimedelta().total_seconds()
    return None


async def _attempt(ca: CA, token: str, csr: str, **kwargs: float) -> grpc.aio.AioRpcError | None:
    try:
        await create_certificate(ca.channel, csr, token=token, **kwargs)  # type: ignore[arg-type]
    except grpc.aio.AioRpcError as err:
        return err
    return None


async def test_per_peer_rate_limit_answers_with_a_retry_hint(start_ca: StartCA) -> None:
    # 5/minute refills once per 12 s, so no straggler of the 15 slips through on a slow day.
    ca = await start_ca(rate_limit_per_peer="5/minute")
    token = ca.kube.mint_token("default", "web")
    csr = make_csr(WEB_ID)[1]
    results = await asyncio.gather(*(_attempt(ca, token, csr) for _ in range(15)))
    refused = [r for r in results if r is not None]
    assert 1 <= len(results) - len(refused) <= 5
    assert refused and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert "rate limit 5 per 60s per peer" in (refused[0].details() or "")
    delay = retry_delay(refused[0])
    assert delay is not None and 0 < delay <= 12.0


async def test_per_identity_rate_limit(start_ca: StartCA) -> None:
    ca = await start_ca(rate_limit_per_identity="3/minute")
    token = ca.kube.mint_token("default", "web")
    results = [await _attempt(ca, token, make_csr(WEB_ID)[1]) for _ in range(4)]
    assert results[:3] == [None, None, None]
    last = results[3]
    assert last is not None and last.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert WEB_ID in (last.details() or "")
    # Another identity is not affected.
    other = await _attempt(ca, ca.kube.mint_token("default", "db"), make_csr(None)[1])
    assert other is None


async def test_in_flight_bound_refuses_at_once(start_ca: StartCA, tmp_path: Path) -> None:
    async with FakeKubeApi(expected_bearer=None) as slow:
        slow.delay = 0.5  # every TokenReview takes half a second
        ca = await start_ca(max_in_flight=2, k8s_api_server=slow.url)
        token = slow.mint_token("default", "web")
        results = await asyncio.gather(
            *(_attempt(ca, token, make_csr(WEB_ID)[1]) for _ in range(6))
        )
    refused = [r for r in results if r is not None]
    assert len(refused) >= 4
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert "limit of 2 requests in flight" in (refused[0].details() or "")
    assert retry_delay(refused[0]) is not None


async def test_work_stops_when_the_callers_deadline_passes(start_ca: StartCA) -> None:
    async with FakeKubeApi(expected_bearer=None) as slow:
        slow.delay = 1.5
        ca = await start_ca(k8s_api_server=slow.url)
        before = ca.ledger_rows()
        err = await _attempt(
            ca, slow.mint_token("default", "web"), make_csr(WEB_ID)[1], timeout=0.3
        )
        assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(50):  # the server notices on its own clock; bounded wait
            _, metrics = await ca.get("/metrics")
            if 'reason="deadline_exceeded"' in metrics:
                break
            await asyncio.sleep(0.05)
        assert 'meshca_requests_refused_total{api="istio",reason="deadline_exceeded"} 1.0' in (
            metrics
        )
        assert ca.ledger_rows() == before


async def test_a_caller_that_goes_away_is_counted_and_nothing_is_issued(
    start_ca: StartCA,
) -> None:
    async with FakeKubeApi(expected_bearer=None) as slow:
        slow.delay = 1.5
        ca = await start_ca(k8s_api_server=slow.url)
        before = ca.ledger_rows()
        call = create_certificate(
            ca.channel, make_csr(WEB_ID)[1], token=slow.mint_token("default", "web")
        )
        task = asyncio.ensure_future(call)
        await asyncio.sleep(0.3)  # the CA is waiting on the slow TokenReview now
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        needle = 'meshca_requests_refused_total{api="istio",reason="cancelled"} 1.0'
        metrics = ""
        for _ in range(50):  # the cancellation reaches the server asynchronously
            _, metrics = await ca.get("/metrics")
            if needle in metrics:
                break
            await asyncio.sleep(0.05)
        assert needle in metrics
        await asyncio.sleep(1.5)  # past the TokenReview answer: still nothing issued
        assert ca.ledger_rows() == before


async def test_oversized_messages_and_metadata_are_refused(ca: CA) -> None:
    token = ca.kube.mint_token("default", "web")
    err = await _attempt(ca, token, "A" * 100_000)
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    err = await _attempt(ca, "x" * 40_000, make_csr(WEB_ID)[1])
    assert err is not None
    assert err.code() in (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
    )
    # The server stays healthy.
    assert await _attempt(ca, token, make_csr(WEB_ID)[1]) is None


async def test_silent_connections_are_closed(start_ca: StartCA) -> None:
    ca = await start_ca(grpc_handshake_timeout="1s")
    loop = asyncio.get_running_loop()
    with socket.create_connection(("127.0.0.1", ca.server.grpc_port), timeout=10) as sock:
        sock.setblocking(False)
        started = time.monotonic()
        data = await asyncio.wait_for(loop.sock_recv(sock, 1024), 8)
    assert data == b""  # closed by the server, without our sending a byte
    assert time.monotonic() - started < 8


async def test_old_connections_are_told_to_reconnect(start_ca: StartCA, tmp_path: Path) -> None:
    """After --grpc-max-connection-age the client's channel reconnects by itself: the
    ledger shows a new source port, and no request failed on the way."""
    ca = await start_ca(grpc_max_connection_age="1s")
    token = ca.kube.mint_token("default", "web")
    for _ in range(4):
        assert await _attempt(ca, token, make_csr(WEB_ID)[1]) is None
        await asyncio.sleep(0.8)
    with sqlite3.connect(tmp_path / "state" / "meshca.db") as db:
        peers = {
            row[0]
            for row in db.execute("SELECT peer_address FROM ledger WHERE spiffe_id = ?", (WEB_ID,))
        }
    assert len(peers) >= 2, peers


async def test_burst_of_2000_requests_from_200_clients(start_ca: StartCA) -> None:
    """Every client eventually gets its certificates by honouring the retry hints."""
    ca = await start_ca(max_in_flight=8, rate_limit_per_identity="8/second")
    clients, per_client = 200, 10
    tokens = [ca.kube.mint_token("burst", f"sa-{i % 20}") for i in range(clients)]
    admitted: list[float] = []
    refusals = 0

    async def client(i: int) -> int:
        nonlocal refusals
        done = 0
        csr = make_csr(None)[1]
        for _ in range(per_client):
            for _attempt_no in range(200):  # bounded retries
                started = time.perf_counter()
                err = await _attempt(ca, tokens[i], csr, timeout=30)
                if err is None:
                    admitted.append(time.perf_counter() - started)
                    done += 1
                    break
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                refusals += 1
                hint = retry_delay(err) or 0.05
                await asyncio.sleep(hint * (1 + random.random()))
        return done

    started = time.perf_counter()
    results = await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    assert sum(results) == clients * per_client
    assert refusals > 0  # the limits were reached, and retrying got everyone through
    assert (await ca.get("/readyz"))[0] == 200
    assert ca.server.store.verify_ledger().ok
    qs = statistics.quantiles(admitted, n=100)
    print(
        f"\nburst: {clients * per_client} certificates for {clients} clients in {elapsed:.1f}s "
        f"({clients * per_client / elapsed:.0f}/s); {refusals} RESOURCE_EXHAUSTED answers; "
        f"admitted latency p50 {qs[49] * 1000:.0f} ms, p99 {qs[98] * 1000:.0f} ms, "
        f"max {max(admitted) * 1000:.0f} ms"
    )


async def test_a_deadline_that_passes_mid_request_logs_no_traceback(
    start_ca: StartCA, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler's own timeout and gRPC's end of the call race at the deadline: when
    the call is already over, the refusal is counted and logged, never sent (sending it
    made grpcio log an ExecuteBatchError with a traceback)."""
    async with FakeKubeApi(expected_bearer=None) as slow:
        slow.delay = 1.0
        ca = await start_ca(k8s_api_server=slow.url)
        token = slow.mint_token("default", "web")
        # Hold this loop (the CA's) across the deadlines, as a busy CA's loop would be,
        # which makes the race at the deadline more likely; it stays timing-dependent
        # (it showed once without the fix, under load), so the deterministic check is
        # test_a_refusal_is_sent_only_on_a_call_that_is_still_open below.
        asyncio.get_running_loop().call_later(0.15, time.sleep, 0.6)
        with caplog.at_level(logging.INFO):
            results = await asyncio.gather(
                *(
                    _attempt(ca, token, make_csr(WEB_ID)[1], timeout=0.2 + i * 0.01)
                    for i in range(20)
                )
            )
            await asyncio.sleep(1.5)  # every handler has reached its deadline
        codes = {r.code() if r is not None else None for r in results}
        assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED}
        # Each abandoned call is counted once (deadline_exceeded, or cancelled when gRPC
        # cancelled the handler a moment before its own clock reached the deadline).
        metrics = (await ca.get("/metrics"))[1]
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith('meshca_requests_refused_total{api="istio",reason="')
            and ('"deadline_exceeded"' in line or '"cancelled"' in line)
        )
        assert counted == 20
        errors = [
            r
            for r in caplog.records
            if r.name.startswith(("grpc", "meshca")) and (r.levelno >= logging.ERROR or r.exc_info)
        ]
        assert errors == [], [r.getMessage() for r in errors]


class _Call:
    """The parts of a servicer context a refusal touches; records what was sent."""

    def __init__(self, remaining: float | None, done: bool = False) -> None:
        self.remaining = remaining
        self.ended = done
        self.sent: list[grpc.StatusCode] = []

    def time_remaining(self) -> float | None:
        return self.remaining

    def done(self) -> bool:
        return self.ended

    async def abort(self, code: grpc.StatusCode, message: str, **_: object) -> None:
        self.sent.append(code)
        raise grpc.aio.AbortError(message)


@pytest.mark.parametrize(
    ("call", "callers_deadline", "sent"),
    [
        (_Call(remaining=0.001), True, []),  # the caller's deadline fired our timeout
        (_Call(remaining=-0.01), False, []),  # gRPC's clock is past the deadline already
        (_Call(remaining=4.0, done=True), False, []),  # the caller went away
        (_Call(remaining=4.0), False, [grpc.StatusCode.DEADLINE_EXCEEDED]),
        (_Call(remaining=None), False, [grpc.StatusCode.DEADLINE_EXCEEDED]),
    ],
)
async def test_a_refusal_is_sent_only_on_a_call_that_is_still_open(
    call: _Call, callers_deadline: bool, sent: list[grpc.StatusCode]
) -> None:
    frontend = CertificateFrontend(cast(Any, None), cast(Any, None), CAMetrics())
    expected = asyncio.CancelledError if not sent else grpc.aio.AbortError
    with pytest.raises(expected):
        await frontend._refuse(
            "istio",
            Peer(address="127.0.0.1:1"),
            time.perf_counter(),
            cast(Any, call),
            "deadline_exceeded",
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "the caller's deadline passed",
            callers_deadline=callers_deadline,
        )
    assert call.sent == sent
