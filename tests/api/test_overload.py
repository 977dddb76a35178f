"""Overload control: in-flight bound, rate limits with retry hints, deadlines, size and
time limits on connections, and a burst that every client survives by retrying."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import sqlite3
import statistics
import time
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2

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
