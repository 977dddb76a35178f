"""Rotation under traffic: both workloads' SVIDs rotate every half second while a client
keeps opening new connections through the outbound and the inbound proxy and an older
connection keeps streaming. No handshake may fail, no stream may break, and the new
handshakes must use the new certificates."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from meshca.agent.credentials import CredentialStore
from tests.agent.support import LocalCA
from tests.proxy.conftest import Echo
from tests.proxy.support import BACKEND, FRONTEND, WAIT, config, plain_exchange, proxy, read_log

LISTEN = "127.0.0.1:0"
ROTATIONS = 8
PERIOD = 0.5
CHUNK = b"x" * 16384


async def test_rotation_under_traffic(ca: LocalCA, echo: Echo, tmp_path: Path) -> None:
    back_store, front_store = CredentialStore(), CredentialStore()
    await ca.publish(back_store, BACKEND)
    await ca.publish(front_store, FRONTEND)
    back_cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",), log_name="b.log")
    async with proxy(back_cfg, back_store) as back:
        await back.wait_ready()
        target = f"127.0.0.1:{back.ports[LISTEN]}"
        front_cfg = config(tmp_path, outbound=(f"{LISTEN}={target},{BACKEND}",), log_name="f.log")
        async with proxy(front_cfg, front_store) as front:
            await front.wait_ready()
            port = front.ports[LISTEN]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            done = asyncio.Event()

            async def stream() -> int:
                sent = 0
                while not done.is_set():
                    writer.write(CHUNK)
                    await writer.drain()
                    assert await asyncio.wait_for(reader.readexactly(len(CHUNK)), WAIT) == CHUNK
                    sent += len(CHUNK)
                    await asyncio.sleep(0.01)
                return sent

            async def connect_repeatedly() -> list[bytes]:
                answers = []
                while not done.is_set():
                    answers.append(await plain_exchange(port, b"new connection"))
                    await asyncio.sleep(0.02)
                return answers

            async def rotate() -> None:
                for _ in range(ROTATIONS):
                    await asyncio.sleep(PERIOD)
                    await ca.publish(back_store, BACKEND)
                    await ca.publish(front_store, FRONTEND)
                await asyncio.sleep(PERIOD)
                done.set()

            streamed, answers, _ = await asyncio.gather(stream(), connect_repeatedly(), rotate())
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            await asyncio.sleep(0.2)
    assert answers and all(a == b"new connection" for a in answers), "a new connection failed"
    assert streamed >= ROTATIONS * len(CHUNK)
    back_log, front_log = read_log(tmp_path / "b.log"), read_log(tmp_path / "f.log")
    assert all(line["decision"] == "allow" for line in back_log + front_log), [
        line["reason"] for line in back_log + front_log if line["decision"] != "allow"
    ]
    # Each side saw the other's certificates change as they rotated.
    assert len({line["peer_serial"] for line in back_log}) >= ROTATIONS // 2
    assert len({line["peer_serial"] for line in front_log}) >= ROTATIONS // 2
    longest = max(back_log, key=lambda line: line["bytes_received"])
    assert longest["bytes_received"] == streamed


async def test_a_new_trust_bundle_applies_to_the_next_handshake(
    ca: LocalCA, echo: Echo, tmp_path: Path
) -> None:
    from tests.proxy.support import client_context, identity_files, tls_exchange

    store = CredentialStore()
    await ca.publish(store, BACKEND)
    new_ca = LocalCA()
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old_client = identity_files(ca, tmp_path / "old", FRONTEND)
    new_client = identity_files(new_ca, tmp_path / "new", FRONTEND)
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",))
    async with proxy(cfg, store) as running:
        await running.wait_ready()
        port = running.ports[LISTEN]
        assert await tls_exchange(port, client_context(old_client, old_client.roots)) == b"ping"
        # The trust domain moves to a new root: our SVID and bundle come from it.
        await new_ca.publish(store, BACKEND)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while running.state.contexts is None or running.state.contexts.creds.version < 2:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        assert await tls_exchange(port, client_context(new_client, new_client.roots)) == b"ping"
        try:
            refused = await tls_exchange(port, client_context(old_client, new_client.roots))
        except (ConnectionError, OSError):
            refused = b""
        assert refused == b""
    lines = read_log(tmp_path / "access.log")
    assert [line["decision"] for line in lines] == ["allow", "allow", "deny"]
    assert lines[2]["reason"] == "certificate verify failed: unable to get local issuer certificate"


async def test_a_publication_that_cannot_be_loaded_for_want_of_descriptors_is_retried(
    ca: LocalCA, echo: Echo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of file descriptors (a connection flood) when new credentials arrive: the proxy
    must go on following rotations once descriptors are free, not keep the old SVID and
    the old bundle (with a root that may be retired) until it is restarted."""
    import errno
    import os

    store = CredentialStore()
    await ca.publish(store, BACKEND)
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",))
    async with proxy(cfg, store) as running:
        await running.wait_ready()
        real = os.memfd_create
        failures = []

        def exhausted(name: str, flags: int = 0) -> int:
            if not failures:
                failures.append(name)
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return real(name, flags)

        monkeypatch.setattr(os, "memfd_create", exhausted)
        await ca.publish(store, BACKEND)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while running.state.contexts is None or running.state.contexts.creds.version < 2:
            assert loop.time() < deadline, "the new credentials were never loaded"
            assert all(not t.done() for t in running.tasks), "a proxy task ended"
            await asyncio.sleep(0.05)
        assert failures, "the test did not exhaust descriptors"
        # Later rotations are followed too.
        await ca.publish(store, BACKEND)
        while running.state.contexts.creds.version < 3:
            assert loop.time() < deadline, "a later rotation was not followed"
            await asyncio.sleep(0.05)
