"""nginx fed by the file sink: serves the SVID, and the rotated one after a reload.

A real peer, as a VM operator runs it: nginx reads ``ssl_certificate`` and
``ssl_certificate_key`` from the sink's files, verifies clients against the sink's
bundle, and is reloaded by the sink after every write, either with the command an
operator would configure (``nginx -s reload``) or with SIGHUP to nginx's pid file.
Skipped when Debian's nginx is not installed.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.agent.credentials import CredentialStore
from meshca.agent.filesink import FileSink
from meshca.pki import profile
from meshca.spiffe import SpiffeId
from tests.agent.nginx_peer import NGINX, NOT_INSTALLED, NginxServer, fetch
from tests.agent.support import TD, WEB, LocalCA

pytestmark = pytest.mark.skipif(not NGINX.exists(), reason=NOT_INSTALLED)

CLIENT = TD.workload("default", "client")


@pytest.fixture
def nginx_servers() -> Iterator[list[NginxServer]]:
    """Servers a test starts; every one is stopped at teardown, pass or fail."""
    servers: list[NginxServer] = []
    yield servers
    for server in servers:
        server.stop()


def _client_files(ca: LocalCA, directory: Path) -> tuple[Path, Path]:
    key, chain = ca.issue(CLIENT)
    cert_path, key_path = directory / "client.pem", directory / "client-key.pem"
    cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _spiffe_id(cert: x509.Certificate) -> SpiffeId:
    (uri,) = profile.uri_sans(cert)
    return SpiffeId.parse(uri)


@pytest.mark.parametrize("reload_by", ["command", "signal"])
async def test_nginx_serves_the_svid_and_the_rotated_one_after_reload(
    tmp_path: Path, nginx_servers: list[NginxServer], reload_by: str
) -> None:
    out = tmp_path / "certs"
    out.mkdir(mode=0o755)
    out.chmod(0o755)
    server = NginxServer(
        prefix=tmp_path / "nginx",
        cert=out / "cert-chain.pem",
        key=out / "key.pem",
        bundle=out / "root-cert.pem",
    )
    nginx_servers.append(server)
    if reload_by == "command":
        sink = FileSink(out, reload_command=server.reload_command(), reload_timeout=10)
    else:
        sink = FileSink(out, reload_signal=signal.SIGHUP, reload_pid_file=server.pid_file)
    ca, store = LocalCA(), CredentialStore()
    client_cert, client_key = _client_files(ca, tmp_path)

    first = await ca.publish(store)
    await sink.start(store)
    try:
        assert await asyncio.wait_for(sink.wait_handled(1), 10)
        # nginx is not running yet: `nginx -s reload` fails (logged); no pid file, no signal
        if reload_by == "command":
            assert sink.stats.reload_failures == 1
        else:
            assert sink.stats.reloads_skipped == 1

        await asyncio.to_thread(server.start)
        served, response = await asyncio.to_thread(
            fetch, server.port, sink.bundle_path, client_cert, client_key
        )
        assert served.serial_number == first.leaf.serial_number
        assert _spiffe_id(served) == WEB
        assert b"verify=SUCCESS" in response  # nginx verified our SVID against the bundle

        rotated = await ca.publish(store, ttl=timedelta(seconds=20))
        assert await asyncio.wait_for(sink.wait_handled(rotated.version), 10)
        assert sink.stats.reloads == 1

        deadline = time.monotonic() + 10
        while served.serial_number != rotated.leaf.serial_number:
            assert time.monotonic() < deadline, (
                f"nginx still serves the old certificate after 10 s:\n{server.log_tail()}"
            )
            await asyncio.sleep(0.1)
            served, response = await asyncio.to_thread(
                fetch, server.port, sink.bundle_path, client_cert, client_key
            )
        assert _spiffe_id(served) == WEB
        assert served.not_valid_after_utc == rotated.not_after
        assert b"verify=SUCCESS" in response
    finally:
        await sink.stop()
    assert await asyncio.to_thread(server.stop) == 0
