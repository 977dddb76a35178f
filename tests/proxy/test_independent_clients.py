"""curl and openssl s_client as independent mTLS clients of the inbound port.

Each runs as a subprocess against the proxy on loopback; skipped (with the reason) when the
tool is not installed.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from meshca.agent.credentials import CredentialStore
from tests.agent.support import LocalCA
from tests.proxy.bad_certs import bad_client
from tests.proxy.support import (
    BACKEND,
    FRONTEND,
    WAIT,
    Files,
    config,
    identity_files,
    proxy,
    wait_for_log,
)

LISTEN = "127.0.0.1:0"

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl is not installed"
)


async def run(*argv: str, stdin: bytes = b"") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), WAIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def curl(port: int, files: Files | None, roots: Path) -> list[str]:
    argv = ["curl", "-sS", "--max-time", "5", "--cacert", str(roots)]
    if files is not None:
        argv += ["--cert", str(files.cert), "--key", str(files.key)]
    # The SVID has no DNS name: curl checks the chain, the proxy checks curl's SPIFFE ID.
    return [*argv, "--insecure", f"https://127.0.0.1:{port}/"]


@needs_curl
@pytest.mark.parametrize(
    "defect",
    ["no-certificate", "expired", "other-domain", "self-signed", "two-uri-sans"],
)
async def test_curl_with_a_client_certificate_and_each_defect(
    ca: LocalCA, http_app: int, tmp_path: Path, defect: str
) -> None:
    store = CredentialStore()
    await ca.publish(store, BACKEND)
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{http_app},http",))
    async with proxy(cfg, store) as running:
        await running.wait_ready()
        port = running.ports[LISTEN]
        good = identity_files(ca, tmp_path, FRONTEND)
        code, out = await run(*curl(port, good, good.roots))
        assert code == 0, out
        assert out == "hello from the app\n"
        bad = None if defect == "no-certificate" else bad_client(ca, tmp_path, defect)
        code, out = await run(*curl(port, bad, good.roots))
        assert code != 0, f"curl with {defect} got through: {out}"
        lines = await wait_for_log(
            tmp_path / "access.log",
            lambda lines: any(line["decision"] == "deny" for line in lines),
            "a refusal",
        )
    request = next(line for line in lines if line.get("method"))
    assert request["method"] == "GET" and request["path"] == "/" and request["status"] == 200
    assert request["peer_spiffe_id"] == str(FRONTEND)
    refused = next(line for line in lines if line["decision"] == "deny")
    assert refused["reason"]
    assert refused["peer_address"] == "127.0.0.1"


@needs_openssl
async def test_openssl_s_client_with_and_without_a_certificate(
    ca: LocalCA, http_app: int, tmp_path: Path
) -> None:
    store = CredentialStore()
    await ca.publish(store, BACKEND)
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{http_app}",))
    async with proxy(cfg, store) as running:
        await running.wait_ready()
        port = running.ports[LISTEN]
        good = identity_files(ca, tmp_path, FRONTEND)
        base = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(good.roots)]
        base += ["-verify_return_error", "-quiet"]  # -quiet: wait for the answer after EOF
        request = b"GET / HTTP/1.0\r\nHost: app\r\n\r\n"
        mine = ["-cert", str(good.cert), "-cert_chain", str(good.cert), "-key", str(good.key)]
        _, out = await run(*base, *mine, stdin=request)
        assert "hello from the app" in out, out
        _, out = await run(*base, stdin=request)
        assert "hello from the app" not in out
        lines = await wait_for_log(tmp_path / "access.log", lambda lines: len(lines) == 2, "2")
    allowed, refused = lines
    assert allowed["decision"] == "allow" and allowed["peer_spiffe_id"] == str(FRONTEND)
    assert allowed["tls_version"] == "TLSv1.3"
    assert refused["decision"] == "deny"
    assert refused["reason"] == "TLS handshake failed: peer did not return a certificate"


@needs_openssl
async def test_tls_1_2_is_refused_unless_configured(
    ca: LocalCA, http_app: int, tmp_path: Path
) -> None:
    store = CredentialStore()
    await ca.publish(store, BACKEND)
    good = identity_files(ca, tmp_path, FRONTEND)
    for min_version, accepted in (("1.3", False), ("1.2", True)):
        cfg = config(
            tmp_path,
            inbound=(f"{LISTEN}=127.0.0.1:{http_app}",),
            tls_min_version=min_version,
            log_name=f"{min_version}.log",
        )
        async with proxy(cfg, store) as running:
            await running.wait_ready()
            port = running.ports[LISTEN]
            argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-quiet"]
            argv += ["-CAfile", str(good.roots), "-cert", str(good.cert), "-key", str(good.key)]
            argv += ["-cert_chain", str(good.cert)]  # s_client sends only -cert without it
            _, out = await run(*argv, stdin=b"GET / HTTP/1.0\r\n\r\n")
            assert ("hello from the app" in out) is accepted, out
            (line,) = await wait_for_log(
                tmp_path / f"{min_version}.log", lambda lines: len(lines) == 1, "1"
            )
        if accepted:
            assert line["tls_version"] == "TLSv1.2"
            assert line["tls_cipher"].startswith("ECDHE-")
        else:
            assert line["decision"] == "deny"
            assert "unsupported protocol" in line["reason"]
