"""One agent with every delivery path on at once, against a real CA with short-lived
certificates: each rotation reaches Envoy (SDS) and the files, and every socket is
private. (py-spiffe receiving rotations is tested in test_workload_api.py.)"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.agent.conftest import StartCA, eventually, settings_for, start
from tests.agent.sds_client import EnvoySdsClient
from tests.support import uri_sans

WEB = "spiffe://cluster.local/ns/default/sa/web"


def _leaf_serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificates(pem)[0].serial_number


async def test_rotation_reaches_envoy_and_files_with_all_paths_on(
    start_ca: StartCA, tmp_path: Path, agents: list
) -> None:
    ca = await start_ca(default_ttl="4s", max_ttl="4s")
    out = tmp_path / "out"
    out.mkdir(mode=0o755)
    sockets = tmp_path / "run"
    sockets.mkdir(mode=0o700)
    agent = await start(
        agents,
        settings_for(
            ca,
            tmp_path,
            ttl="4s",
            sds_socket=sockets / "sds.sock",
            workload_api_socket=sockets / "agent.sock",
            output_dir=out,
        ),
    )
    first = await agent.wait_ready()
    assert str(first.spiffe_id) == WEB

    async with EnvoySdsClient(sockets / "sds.sock") as envoy:
        await envoy.wait_for(lambda c: bool(c.received), timeout=5)
        serials_seen: set[int] = set()
        for _ in range(3):  # three rotations of a ~4 s certificate, in real time
            creds = await agent.store.wait_newer(agent.store.current().version)  # type: ignore[union-attr]
            received = await envoy.wait_for_version(creds.version, timeout=10)
            secrets = received.secrets
            chain = secrets["default"].tls_certificate.certificate_chain.inline_bytes
            key = serialization.load_pem_private_key(
                secrets["default"].tls_certificate.private_key.inline_bytes, None
            )
            leaf = x509.load_pem_x509_certificates(chain)[0]
            assert uri_sans(leaf) == [WEB]
            assert leaf.public_key() == key.public_key()  # type: ignore[union-attr]
            assert leaf.serial_number == creds.leaf.serial_number
            serials_seen.add(leaf.serial_number)
            await eventually(
                lambda c=creds: (
                    (out / "cert-chain.pem").exists()
                    and _leaf_serial((out / "cert-chain.pem").read_bytes()) == c.leaf.serial_number
                ),
                timeout=10,
                what="the files to hold the new certificate",
            )
        assert len(serials_seen) == 3
    assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sockets / "agent.sock").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sockets / "sds.sock").st_mode) == 0o600
