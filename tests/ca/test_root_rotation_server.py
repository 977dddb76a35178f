"""The CA server and root rotation: following an activation on its own maintenance loop,
starting again after a rotation, warning before the root expires, refusing an expired one."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from cryptography import x509

from meshca.ca.roots import create_root, prepare_root
from meshca.cli.main import main
from meshca.config import load_settings
from meshca.errors import ConfigError
from meshca.pki.keys import KeyAlgorithm
from meshca.pki.profile import fingerprint
from meshca.server import start_server
from meshca.signers.file import FileSigner
from meshca.spiffe import TrustDomain
from meshca.store import Store

TD = TrustDomain("cluster.local")


def _settings(state: Path, **overrides: Any) -> Any:
    return load_settings(
        state_dir=state,
        grpc_listen="127.0.0.1:0",
        grpc_mtls_listen="off",
        http_listen="127.0.0.1:0",
        **overrides,
    )


def _store(state: Path) -> Store:
    return Store.open(f"sqlite:///{state / 'meshca.db'}")


async def test_server_follows_an_activation_and_restarts_on_the_new_root(tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = await start_server(_settings(state, maintenance_interval="200ms"))
    try:
        old = fingerprint(server.authority.root_certificate)
        store = _store(state)
        try:
            new_key = FileSigner.create(tmp_path / "new-root.pem", KeyAlgorithm.EC_P256)
            new = prepare_root(store, new_key, TD, ttl=timedelta(days=30), now=datetime.now(UTC))
            store.activate_root(
                new.fingerprint, now=datetime.now(UTC), propagation=timedelta(0), force=False
            )
        finally:
            store.close()
        # No one calls maintain_once here: the server's own loop (every 200 ms) follows.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while fingerprint(server.authority.root_certificate) != new.fingerprint:
            assert loop.time() < deadline, "the server did not switch to the new root"
            await asyncio.sleep(0.05)
        issuing = server.authority.current_issuing_ca
        assert issuing is not None and issuing.chain_tail[-1] == new.certificate_pem
        assert server.server_cert is not None
        assert server.server_cert.chain_pem[-1] == new.certificate_pem
    finally:
        await server.stop(grace=0)
    # Started again with the same config (which names the old key file): the store's
    # active root decides, and its key is opened from the record.
    again = await start_server(_settings(state))
    try:
        assert fingerprint(again.authority.root_certificate) == new.fingerprint != old
        assert again.authority.root_signer.key_id == str(tmp_path / "new-root.pem")
        assert "root " + new.fingerprint[:16] in again.status_line()
    finally:
        await again.stop(grace=0)


async def test_warning_when_the_active_root_nears_expiry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(_settings(tmp_path / "state", root_expiry_warning="4000d"))
    try:
        with caplog.at_level(logging.WARNING, logger="meshca.server"):
            await server.maintain_once()
        assert "meshca_root_expiry_warning 1.0" in server.metrics.exposition().decode()
        assert any(
            "the active root" in r.message and "meshca admin root prepare" in r.message
            for r in caplog.records
        )
    finally:
        await server.stop(grace=0)
    quiet = await start_server(_settings(tmp_path / "state"))
    try:
        await quiet.maintain_once()
        assert "meshca_root_expiry_warning 0.0" in quiet.metrics.exposition().decode()
    finally:
        await quiet.stop(grace=0)


async def test_server_refuses_an_expired_active_root_and_says_what_to_run(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    signer = FileSigner.create(state / "root-key.pem", KeyAlgorithm.EC_P256)
    store = _store(state)
    try:
        create_root(
            store, signer, TD, ttl=timedelta(days=1), now=datetime.now(UTC) - timedelta(days=2)
        )
    finally:
        store.close()
    with pytest.raises(ConfigError) as refused:
        await start_server(_settings(state))
    message = refused.value.message
    assert "expired at" in message
    assert "meshca admin root prepare" in message and "activate ID --force" in message

    # Doing what it says brings the server up on a new root.
    runner = CliRunner()
    cli = ["admin", "root"]
    done = runner.invoke(main, [*cli, "prepare", "--state-dir", str(state)])
    assert done.exit_code == 0, done.output
    new_id = done.output.split("root ", 1)[1].split()[0]
    done = runner.invoke(main, [*cli, "activate", "--state-dir", str(state), new_id, "--force"])
    assert done.exit_code == 0, done.output
    server = await start_server(_settings(state))
    try:
        assert fingerprint(server.authority.root_certificate) == new_id
    finally:
        await server.stop(grace=0)


async def _bundle(port: int, fmt: str) -> str:
    url = f"http://127.0.0.1:{port}/v1/bundle?format={fmt}"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        return await resp.text()


async def test_bundle_endpoint_publishes_the_prepared_root_in_both_formats(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    server = await start_server(_settings(state))
    try:
        store = _store(state)
        try:
            new_key = FileSigner.create(tmp_path / "new-root.pem", KeyAlgorithm.EC_P256)
            new = prepare_root(store, new_key, TD, ttl=timedelta(days=30), now=datetime.now(UTC))
            await server.maintain_once()
            pem = await _bundle(server.http_port, "pem")
            doc = json.loads(await _bundle(server.http_port, "spiffe"))
            assert new.fingerprint in {
                fingerprint(c) for c in x509.load_pem_x509_certificates(pem.encode())
            }
            assert len(x509.load_pem_x509_certificates(pem.encode())) == 2
            assert len(doc["keys"]) == 2
            # dropped again before activation: gone from both
            store.retire_root(new.fingerprint, now=datetime.now(UTC), force=False)
            await server.maintain_once()
            assert (
                len(
                    x509.load_pem_x509_certificates(
                        (await _bundle(server.http_port, "pem")).encode()
                    )
                )
                == 1
            )
            assert len(json.loads(await _bundle(server.http_port, "spiffe"))["keys"]) == 1
        finally:
            store.close()
    finally:
        await server.stop(grace=0)


async def test_maintenance_goes_on_when_the_new_root_key_is_missing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    server = await start_server(_settings(state, root_expiry_warning="4000d"))
    try:
        old = fingerprint(server.authority.root_certificate)
        store = _store(state)
        try:
            new_key = FileSigner.create(tmp_path / "new-root.pem", KeyAlgorithm.EC_P256)
            new = prepare_root(store, new_key, TD, ttl=timedelta(days=30), now=datetime.now(UTC))
            (tmp_path / "new-root.pem").unlink()
            store.activate_root(
                new.fingerprint, now=datetime.now(UTC), propagation=timedelta(0), force=True
            )
        finally:
            store.close()
        with caplog.at_level(logging.WARNING, logger="meshca.server"):
            await server.maintain_once()
        messages = [r.getMessage() for r in caplog.records]
        assert any(
            "cannot sign here" in m and f"still signing with root {old[:16]}" in m for m in messages
        ), messages
        # the steps after the root check still ran (the expiry warning is the last one)
        assert any("meshca admin root prepare" in m for m in messages), messages
        assert fingerprint(server.authority.root_certificate) == old
    finally:
        await server.stop(grace=0)
