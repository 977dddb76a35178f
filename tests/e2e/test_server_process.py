"""End to end: ``meshca server`` as a subprocess, an Istio-style client over TLS, the
chain checked by ``openssl verify`` and cryptography, restarts, and the ledger audited and
tampered with through ``meshca admin``."""

from __future__ import annotations

import socket
import sqlite3
import stat
from pathlib import Path

import aiohttp
import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.e2e.conftest import ServerProcess, loopback_args, run_meshca, start_meshca
from tests.fakes.kube import FakeKubeApi
from tests.support import (
    create_certificate,
    load_chain,
    make_csr,
    tls_channel,
    uri_sans,
    verify_with_cryptography,
    verify_with_openssl,
)

pytestmark = pytest.mark.e2e

WEB_ID = "spiffe://cluster.local/ns/default/sa/web"


async def _bundle(server: ServerProcess) -> bytes:
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{server.http_port}/v1/bundle"
        async with session.get(url) as resp:
            assert resp.status == 200
            return await resp.read()


async def _issue(server: ServerProcess, kube: FakeKubeApi, workdir: Path) -> list[str]:
    root = await _bundle(server)
    async with tls_channel(f"127.0.0.1:{server.grpc_port}", root) as channel:
        chain = await create_certificate(
            channel, make_csr(WEB_ID)[1], token=kube.mint_token("default", "web")
        )
    assert uri_sans(verify_with_cryptography(chain)) == [WEB_ID]
    assert "OK" in verify_with_openssl(chain, workdir)
    return chain


async def test_first_start_issue_restart_and_audit_on_sqlite(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    state = tmp_path / "state"
    async with FakeKubeApi() as kube:
        args = [*loopback_args(state), "--k8s-oidc-issuer", kube.issuer]
        first = await start_meshca(args)
        processes.append(first)
        assert "gRPC TLS" in first.ready_line
        key_mode = stat.S_IMODE((state / "root-key.pem").stat().st_mode)
        assert key_mode == 0o600
        chain = await _issue(first, kube, tmp_path)
        root_before = await _bundle(first)

        code, out, _ = await run_meshca("admin", "ledger", "verify", "--state-dir", str(state))
        assert code == 0 and "ledger OK" in out, out  # while the server runs
        assert await first.stop() == 0

        second = await start_meshca(args)
        processes.append(second)
        assert await _bundle(second) == root_before
        again = await _issue(second, kube, tmp_path)
        assert load_chain(again)[2] == load_chain(chain)[2]
        await second.stop()

    code, out, err = await run_meshca("admin", "status", "--state-dir", str(state))
    assert code == 0, err
    assert "Roots" in out and "active" in out and "file" in out
    # Two workload certificates and two server certificates, one intermediate per start;
    # both intermediates are retired: their processes stopped cleanly.
    counts_row = out.split("Counts")[1].splitlines()[3].split()
    assert counts_row == ["1", "2", "2", "2"]
    intermediates = out.split("Issuing intermediates")[1].split("Counts")[0]
    assert intermediates.count(" retired ") == 2 and "in use" not in intermediates

    db = sqlite3.connect(state / "meshca.db")
    db.execute(
        "UPDATE ledger SET spiffe_id = 'spiffe://cluster.local/ns/x/sa/y' WHERE sequence = 2"
    )
    db.commit()
    db.close()
    code, out, err = await run_meshca("admin", "ledger", "verify", "--state-dir", str(state))
    assert code == 1
    assert "edited (1):\n  sequence 2 (serial " in out and "ledger does not verify" in err


@pytest.mark.postgres
async def test_postgres_ledger_tamper_is_named(
    tmp_path: Path, processes: list[ServerProcess], postgres_url: str
) -> None:
    async with FakeKubeApi() as kube:
        server = await start_meshca(
            [
                *loopback_args(tmp_path / "state"),
                "--database-url",
                postgres_url,
                "--k8s-oidc-issuer",
                kube.issuer,
            ]
        )
        processes.append(server)
        for _ in range(3):
            await _issue(server, kube, tmp_path)
        await server.stop()

    code, out, _ = await run_meshca("admin", "ledger", "verify", "--database-url", postgres_url)
    assert code == 0 and "4 rows verified" in out
    url = make_url(postgres_url)
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database, autocommit=True
    ) as conn:
        conn.execute("DELETE FROM ledger WHERE sequence = 3")
    code, out, _ = await run_meshca("admin", "ledger", "verify", "--database-url", postgres_url)
    assert code == 1 and "missing (1):\n  sequence 3: missing (deleted)" in out


async def test_start_up_errors_are_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = await run_meshca(
            "server",
            "--state-dir",
            str(tmp_path),
            "--grpc-listen",
            f"127.0.0.1:{port}",
            "--http-listen",
            "127.0.0.1:0",
            "--plaintext",
        )
    assert code == 2
    assert f"cannot listen for gRPC on 127.0.0.1:{port}" in err

    code, _, err = await run_meshca("server", "--state-dir", str(tmp_path), "--max-ttl", "soon")
    assert code == 2 and "invalid duration 'soon'" in err

    code, _, err = await run_meshca(
        "server", "--state-dir", str(tmp_path), env={"MESHCA_TRUST_DOMAIN": "Not A Domain"}
    )
    assert code == 2 and "trust_domain" in err


async def test_help_documents_every_flag_with_its_variable() -> None:
    code, out, _ = await run_meshca("server", "--help")
    assert code == 0
    for flag, env in [
        ("--config", "MESHCA_CONFIG"),
        ("--trust-domain", "MESHCA_TRUST_DOMAIN"),
        ("--grpc-listen", "MESHCA_GRPC_LISTEN"),
        ("--http-listen", "MESHCA_HTTP_LISTEN"),
        ("--database-url", "MESHCA_DATABASE_URL"),
        ("--state-dir", "MESHCA_STATE_DIR"),
        ("--k8s-oidc-issuer", "MESHCA_K8S_OIDC_ISSUER"),
        ("--k8s-jwks-url", "MESHCA_K8S_JWKS_URL"),
        ("--k8s-api-server", "MESHCA_K8S_API_SERVER"),
        ("--token-audience", "MESHCA_TOKEN_AUDIENCE"),
        ("--max-ttl", "MESHCA_MAX_TTL"),
        ("--plaintext", "MESHCA_PLAINTEXT"),
    ]:
        assert flag in out and env in out, flag
