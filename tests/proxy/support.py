"""Helpers for proxy tests: identities from an in-memory CA, loopback apps, TLS clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.agent.credentials import CredentialStore
from meshca.pki.keys import PrivateKey
from meshca.proxy.config import Inbound, Limits, Outbound, ProxyConfig
from meshca.proxy.run import RunningProxy, start_proxy
from meshca.spiffe import SpiffeId
from tests.agent.support import TD, LocalCA

WAIT = 10.0
FRONTEND = TD.workload("shop", "frontend")
BACKEND = TD.workload("shop", "backend")
INTRUDER = TD.workload("other", "intruder")


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Files:
    """PEM files of one identity (for curl, openssl and Python clients)."""

    def __init__(
        self,
        directory: Path,
        name: str,
        key: PrivateKey,
        chain: tuple[x509.Certificate, ...],
        roots: tuple[x509.Certificate, ...],
    ) -> None:
        self.cert = directory / f"{name}-chain.pem"
        self.key = directory / f"{name}-key.pem"
        self.roots = directory / f"{name}-roots.pem"
        self.cert.write_bytes(pem(*chain))
        self.key.write_bytes(key_pem(key))
        self.roots.write_bytes(pem(*roots))


def identity_files(
    ca: LocalCA, directory: Path, spiffe_id: SpiffeId, ttl: timedelta = timedelta(hours=1)
) -> Files:
    key, chain = ca.issue(spiffe_id, ttl)
    return Files(directory, spiffe_id.path.replace("/", "_"), key, chain, (ca.root,))


def client_context(files: Files | None, roots: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(roots)
    if files is not None:
        ctx.load_cert_chain(files.cert, files.key)
    return ctx


async def echo_server() -> asyncio.Server:
    """A plain TCP application on loopback that echoes, prefixed by nothing."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def port_of(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


async def tls_exchange(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping") -> bytes:
    """Connect with TLS, send ``payload``, read until as many bytes came back or EOF."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="proxy"), WAIT
    )
    try:
        writer.write(payload)
        await writer.drain()
        got = b""
        while len(got) < len(payload):
            chunk = await asyncio.wait_for(reader.read(65536), WAIT)
            if not chunk:
                break
            got += chunk
        return got
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def plain_exchange(port: int, payload: bytes = b"ping") -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    try:
        writer.write(payload)
        await writer.drain()
        got = b""
        while len(got) < len(payload):
            chunk = await asyncio.wait_for(reader.read(65536), WAIT)
            if not chunk:
                break
            got += chunk
        return got
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def wait_for_log(
    path: Path, check: Callable[[list[dict[str, Any]]], bool], what: str
) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        lines = read_log(path)
        if check(lines):
            return lines
        if loop.time() > deadline:
            raise AssertionError(f"not in the access log within {WAIT}s: {what}; log: {lines}")
        await asyncio.sleep(0.02)


def config(
    tmp: Path,
    *,
    inbound: tuple[str, ...] = (),
    outbound: tuple[str, ...] = (),
    policy: Path | None = None,
    log_name: str = "access.log",
    **options: Any,
) -> ProxyConfig:
    limits = options.pop("limits", Limits(handshake_timeout=5, idle_timeout=30, connect_timeout=2))
    return ProxyConfig(
        inbound=tuple(Inbound.parse(i) for i in inbound),
        outbound=tuple(Outbound.parse(o) for o in outbound),
        policy_file=policy,
        access_log=tmp / log_name,
        limits=limits,
        **options,
    )


@contextlib.asynccontextmanager
async def proxy(
    cfg: ProxyConfig, store: CredentialStore | None = None
) -> AsyncIterator[RunningProxy]:
    running = await start_proxy(cfg, store)
    try:
        yield running
    finally:
        await running.stop()


def short_dir() -> Path:
    """A directory with a short path (Unix sockets are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="px-", dir=os.environ.get("TMPDIR", "/tmp")))
