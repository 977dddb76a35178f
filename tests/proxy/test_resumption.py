"""TLS 1.2 session resumption (a session ID the server cached) against the checks.

OpenSSL's server keeps a session cache per context that Python cannot turn off, so with
``--tls-min-version 1.2`` a client may resume a session instead of sending its
certificate again. A resumed handshake verifies no certificate: the proxy must still
refuse a certificate whose validity has ended, and a session made under one trust
bundle must not resume under the next."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from meshca.agent.credentials import CredentialStore
from tests.agent.support import LocalCA
from tests.proxy.conftest import Echo
from tests.proxy.support import (
    BACKEND,
    FRONTEND,
    WAIT,
    Files,
    client_context,
    config,
    proxy,
    read_log,
    wait_for_log,
)

LISTEN = "127.0.0.1:0"


def _exchange(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[bool, bytes, ssl.SSLSession | None]:
    """One blocking TLS 1.2 connection: (resumed?, what came back, the session)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        with ctx.wrap_socket(raw, server_hostname="proxy", session=session) as tls:
            tls.sendall(b"ping")
            try:
                got = tls.recv(16)
            except (ConnectionError, ssl.SSLError):
                got = b""
            return tls.session_reused, got, tls.session


def _tls12_client(files: Files) -> ssl.SSLContext:
    ctx = client_context(files, files.roots)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def test_a_resumed_session_is_refused_once_the_client_certificate_expired(
    ca: LocalCA, echo: Echo, tmp_path: Path
) -> None:
    store = CredentialStore()
    await ca.publish(store, BACKEND)
    key, chain = ca.issue(FRONTEND, timedelta(seconds=2))
    short = Files(tmp_path, "short-lived", key, chain, (ca.root,))
    ctx = _tls12_client(short)
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",), tls_min_version="1.2")
    async with proxy(cfg, store) as running:
        await running.wait_ready()
        port = running.ports[LISTEN]
        resumed, got, session = await asyncio.to_thread(_exchange, port, ctx, None)
        assert (resumed, got) == (False, b"ping")
        resumed, got, session = await asyncio.to_thread(_exchange, port, ctx, session)
        assert (resumed, got) == (True, b"ping"), "the server no longer resumes sessions"
        expired_at = chain[0].not_valid_after_utc
        await asyncio.sleep((expired_at - datetime.now(UTC)).total_seconds() + 1.1)
        resumed, got, _ = await asyncio.to_thread(_exchange, port, ctx, session)
        assert resumed, "the test needs a resumed session"
        assert got == b"", "an expired certificate got through on a resumed session"
        lines = await wait_for_log(tmp_path / "access.log", lambda lines: len(lines) == 3, "3")
    assert [line["decision"] for line in lines] == ["allow", "allow", "deny"]
    assert lines[2]["reason"].startswith("the peer certificate expired at ")
    assert lines[2]["bytes_received"] == 0
    assert echo.accepted == 2


async def test_a_session_does_not_resume_under_a_new_trust_bundle(
    ca: LocalCA, echo: Echo, tmp_path: Path
) -> None:
    store = CredentialStore()
    await ca.publish(store, BACKEND)
    key, chain = ca.issue(FRONTEND)
    ctx = _tls12_client(Files(tmp_path, "frontend", key, chain, (ca.root,)))
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",), tls_min_version="1.2")
    async with proxy(cfg, store) as running:
        await running.wait_ready()
        port = running.ports[LISTEN]
        _, got, session = await asyncio.to_thread(_exchange, port, ctx, None)
        assert got == b"ping"
        # The old root is retired: our new SVID and bundle come from another root only.
        new_ca = LocalCA()
        await new_ca.publish(store, BACKEND)
        deadline = time.monotonic() + WAIT
        while running.state.contexts is None or running.state.contexts.creds.version < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        ctx.load_verify_locations(cadata=new_ca.root.public_bytes(Encoding.PEM).decode())
        try:
            resumed, got, _ = await asyncio.to_thread(_exchange, port, ctx, session)
        except (ConnectionError, ssl.SSLError):
            resumed, got = False, b""
        assert not resumed and got == b""
        await wait_for_log(tmp_path / "access.log", lambda lines: len(lines) == 2, "2")
    refused = read_log(tmp_path / "access.log")[1]
    assert refused["decision"] == "deny"
    assert refused["reason"].startswith("certificate verify failed")
