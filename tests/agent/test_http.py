"""The agent's health and metrics server (meshca.agent.http) over a real loopback socket,
and what ``meshca agent`` imports (every pod runs one, so its memory counts)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshca.agent import http
from meshca.agent.credentials import CredentialStore
from meshca.agent.metrics import AgentMetrics, listen_http, start_http
from meshca.errors import ConfigError
from meshca.spiffe import SpiffeId


async def _publish(store: CredentialStore, not_after: datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "t")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(not_after - timedelta(hours=2))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    await store.publish(SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b"), key, (cert,), ())


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, CredentialStore, AgentMetrics]]:
    store, metrics = CredentialStore(), AgentMetrics()
    metrics.track(store)
    server, port = await start_http("127.0.0.1", 0, store, metrics)
    try:
        yield port, store, metrics
    finally:
        await server.stop()


async def _raw(port: int, request: bytes, *, read_until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        if read_until_close:
            return await asyncio.wait_for(reader.read(), 5)
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


async def test_routes_answer_as_before(
    served: tuple[int, CredentialStore, AgentMetrics],
) -> None:
    port, store, metrics = served
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:  # one kept-alive connection
        async with session.get(f"{base}/healthz") as resp:
            assert (resp.status, await resp.text()) == (200, "ok\n")
        async with session.get(f"{base}/readyz") as resp:
            assert resp.status == 503
            assert await resp.text() == "not ready\nno certificate yet\n"
        await _publish(store, datetime.now(UTC) + timedelta(hours=1))
        async with session.get(f"{base}/readyz?verbose=1") as resp:
            assert resp.status == 200
            assert "spiffe://cluster.local/ns/a/sa/b valid until" in await resp.text()
        metrics.renewals.labels(via="token").inc()
        async with session.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()
        assert 'meshca_agent_renewals_total{via="token"} 1.0' in text
        assert "meshca_agent_certificate_expiry_seconds 35" in text
        async with session.head(f"{base}/metrics") as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) > 0
            assert await resp.read() == b""


async def test_expired_certificate_is_not_ready(
    served: tuple[int, CredentialStore, AgentMetrics],
) -> None:
    port, store, _ = served
    await _publish(store, datetime.now(UTC) - timedelta(seconds=1))
    answer = await _raw(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"not ready\nthe certificate expired at " in answer


@pytest.mark.parametrize(
    ("request_bytes", "status", "why"),
    [
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", b"404", b"serves /healthz, /readyz, /metrics"),
        (b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"405", b"only GET and HEAD"),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            b"413",
            b"a request body is not accepted",
        ),
        (b"NOT HTTP AT ALL\r\n\r\n", b"400", b"not an HTTP/1.1 request"),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 9000,
            b"431",
            b"request head over 8192 bytes",
        ),
    ],
    ids=["unknown-path", "wrong-method", "body", "garbage", "huge-head"],
)
async def test_refusals_say_why_and_close(
    served: tuple[int, CredentialStore, AgentMetrics],
    request_bytes: bytes,
    status: bytes,
    why: bytes,
) -> None:
    port, _, _ = served
    answer = await _raw(port, request_bytes)  # returns only once the server closes
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")
    assert b"Connection: close\r\n" in answer
    assert why in answer


async def test_idle_connection_is_closed(
    served: tuple[int, CredentialStore, AgentMetrics], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, _, _ = served
    monkeypatch.setattr(http, "IDLE_TIMEOUT", 0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


async def test_connections_over_the_limit_are_closed(
    served: tuple[int, CredentialStore, AgentMetrics], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, _, _ = served
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 2)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    try:
        await asyncio.sleep(0.05)
        answer = await _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer == b""
        for _, writer in held:  # the first two are still served
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for reader, _ in held:
            assert (await asyncio.wait_for(reader.read(4096), 5)).startswith(b"HTTP/1.1 200 OK")
    finally:
        for _, writer in held:
            writer.close()


def test_agent_command_imports_neither_the_ca_nor_a_web_framework() -> None:
    """``meshca agent`` with a token, a bundle file and local sinks (no config file) loads
    no HTTP client or server framework, no YAML parser, no CA code (store, signers, API
    servers) and no cloud SDK."""
    loaded = _modules_loaded_by(
        "meshca.agent.run", "meshca.agent.sds", "meshca.agent.workload_api", "meshca.agent.filesink"
    )
    for absent in (
        "aiohttp",
        "yaml",
        "sqlalchemy",
        "sqlmodel",
        "alembic",
        "psycopg",
        "jwt",
        "kubernetes",
        "google.cloud",
        "pkcs11",
        "meshca.server",
        "meshca.store",
        "meshca.ca",
        "meshca.api.grpc",
        "meshca.signers.pkcs11",
        "meshca.proxy",
        "pydantic_settings",
        "meshca.config",
        "meshca.cli.server",
    ):
        assert absent not in loaded, f"meshca agent imports {absent}"


def test_agent_imports_only_the_sinks_it_serves() -> None:
    """An agent with none of its sockets or files turned on (``meshca agent`` and
    ``meshca.agent.run``, as a pod with only the in-process proxy or only metrics has)
    loads neither the Envoy SDS protos, nor the Workload API's, nor the node agent."""
    loaded = _modules_loaded_by("meshca.agent.run")
    assert "meshca.agent.client" in loaded  # the probe did load the agent
    for absent in (
        "envoy",
        "xds",
        "meshca.api._proto.workload_pb2",
        "meshca.agent.sds",
        "meshca.agent.workload_api",
        "meshca.agent.filesink",
        "meshca.agent.node",
        "meshca.agent.kubelet",
    ):
        assert absent not in loaded, f"meshca agent imports {absent} with no sink using it"


async def test_listen_http_names_an_address_it_cannot_bind() -> None:
    store, metrics = CredentialStore(), AgentMetrics()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ConfigError, match=f"^cannot listen for HTTP on {listen}: "):
            await listen_http(listen, store, metrics)
    server, port = await listen_http("127.0.0.1:0", store, metrics)
    try:
        assert port > 0
    finally:
        await server.stop()


def _modules_loaded_by(*modules: str) -> set[str]:
    """What a fresh interpreter has imported once ``meshca agent``'s command is looked up
    and ``modules`` are imported."""
    code = (
        "import sys\n"
        "from meshca.cli.main import main\n"
        "import click\n"
        "main.get_command(click.Context(main), 'agent')\n"
        f"import {', '.join(modules)}\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(out.stdout.split())
