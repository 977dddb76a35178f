"""Inbound and outbound mTLS with real handshakes on loopback: two workloads talk through
their proxies, a third identity is refused, and defective client certificates are refused
with the reason in the access log."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshca.agent.credentials import CredentialStore
from tests.agent.support import LocalCA
from tests.proxy.bad_certs import bad_client
from tests.proxy.conftest import Echo
from tests.proxy.support import (
    BACKEND,
    FRONTEND,
    INTRUDER,
    client_context,
    config,
    identity_files,
    plain_exchange,
    proxy,
    tls_exchange,
    wait_for_log,
)

LISTEN = "127.0.0.1:0"


async def store_for(ca: LocalCA, spiffe_id: object) -> CredentialStore:
    store = CredentialStore()
    await ca.publish(store, spiffe_id)  # type: ignore[arg-type]
    return store


def write_policy(path: Path, allow: list[str], deny: list[str] = ()) -> Path:  # type: ignore[assignment]
    import json

    path.write_text(json.dumps({"listeners": {LISTEN: {"allow": allow, "deny": list(deny)}}}))
    return path


async def test_two_workloads_talk_and_each_log_names_the_peer(
    ca: LocalCA, echo: Echo, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy.yaml", ["spiffe://cluster.local/ns/shop/sa/*"])
    backend_cfg = config(
        tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",), policy=policy, log_name="b.log"
    )
    async with proxy(backend_cfg, await store_for(ca, BACKEND)) as backend:
        await backend.wait_ready()
        target = f"127.0.0.1:{backend.ports[LISTEN]}"
        front_cfg = config(tmp_path, outbound=(f"{LISTEN}={target},{BACKEND}",), log_name="f.log")
        intruder_cfg = config(
            tmp_path, outbound=(f"{LISTEN}={target},{BACKEND}",), log_name="i.log"
        )
        async with (
            proxy(front_cfg, await store_for(ca, FRONTEND)) as front,
            proxy(intruder_cfg, await store_for(ca, INTRUDER)) as intruder,
        ):
            await front.wait_ready()
            await intruder.wait_ready()
            assert await plain_exchange(front.ports[LISTEN], b"order 42") == b"order 42"
            assert await plain_exchange(intruder.ports[LISTEN], b"steal") == b""

            back_log = await wait_for_log(
                tmp_path / "b.log", lambda lines: len(lines) == 2, "two inbound lines"
            )
            front_log = await wait_for_log(
                tmp_path / "f.log", lambda lines: len(lines) == 1, "one outbound line"
            )
    allowed, refused = sorted(back_log, key=lambda line: line["decision"])
    assert allowed["direction"] == "inbound"
    assert allowed["peer_spiffe_id"] == str(FRONTEND)
    assert allowed["local_spiffe_id"] == str(BACKEND)
    assert allowed["peer_address"] == "127.0.0.1" and isinstance(allowed["peer_port"], int)
    assert allowed["decision"] == "allow"
    assert allowed["rule"] == "allow spiffe://cluster.local/ns/shop/sa/*"
    assert allowed["bytes_received"] == allowed["bytes_sent"] == len(b"order 42")
    assert allowed["tls_version"] == "TLSv1.3"
    assert allowed["peer_serial"] and allowed["peer_not_after"]
    assert refused["peer_spiffe_id"] == str(INTRUDER)
    assert refused["decision"] == "deny"
    assert refused["rule"] == f"default deny: no allow rule of {LISTEN} matches"
    assert refused["bytes_sent"] == 0
    (out,) = front_log
    assert out["direction"] == "outbound"
    assert out["peer_spiffe_id"] == str(BACKEND)
    assert out["local_spiffe_id"] == str(FRONTEND)
    assert out["peer_port"] == backend.ports[LISTEN]
    assert out["rule"] == f"expected {BACKEND}"
    assert out["bytes_sent"] == out["bytes_received"] == len(b"order 42")
    assert echo.accepted == 1, "the refused peer must not reach the application"


REFUSALS = {
    "no-certificate": "TLS handshake failed: peer did not return a certificate",
    "expired": "certificate verify failed: certificate has expired",
    "other-domain": "certificate verify failed: unable to get local issuer certificate",
    "self-signed": "certificate verify failed: self-signed certificate",
    "two-uri-sans": "the peer certificate has 2 URI SANs; an X509-SVID has exactly one",
    "ca-true-leaf": "the peer certificate is a CA certificate (CA:true); an X509-SVID is not",
    "cert-sign-leaf": "the peer certificate may sign certificates or CRLs (KeyUsage "
    "keyCertSign or cRLSign); an X509-SVID may not",
    "foreign-id": "is in trust domain other.example; allowed: cluster.local",
}


@pytest.mark.parametrize("defect", sorted(REFUSALS))
async def test_defective_client_certificates_are_refused_with_the_reason(
    ca: LocalCA, echo: Echo, tmp_path: Path, defect: str
) -> None:
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",))
    async with proxy(cfg, await store_for(ca, BACKEND)) as running:
        await running.wait_ready()
        port = running.ports[LISTEN]
        good = identity_files(ca, tmp_path, FRONTEND)
        files = None if defect == "no-certificate" else bad_client(ca, tmp_path, defect)
        try:
            got = await tls_exchange(port, client_context(files, good.roots), b"secret")
        except (ConnectionError, OSError):
            got = b""  # TLS 1.3: the refusal may arrive as a reset or an alert
        assert got == b""
        assert await tls_exchange(port, client_context(good, good.roots)) == b"ping"
        lines = await wait_for_log(tmp_path / "access.log", lambda lines: len(lines) == 2, defect)
    refused = next(line for line in lines if line["decision"] != "allow")
    assert refused["decision"] == "deny"
    assert REFUSALS[defect] in refused["reason"]
    assert refused["peer_address"] == "127.0.0.1"
    assert refused["bytes_received"] == 0
    assert echo.accepted == 1, "only the good client reaches the application"


async def test_connections_before_the_first_certificate_are_refused_and_logged(
    echo: Echo, tmp_path: Path, ca: LocalCA
) -> None:
    store = CredentialStore()
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",))
    async with proxy(cfg, store) as running:
        assert running.not_ready() == "not ready: no certificate from the agent yet"
        good = identity_files(ca, tmp_path, FRONTEND)
        try:
            got = await tls_exchange(running.ports[LISTEN], client_context(good, good.roots))
        except (ConnectionError, OSError):
            got = b""
        assert got == b""
        await ca.publish(store, BACKEND)
        await running.wait_ready()
        assert running.not_ready() is None
        port = running.ports[LISTEN]
        assert await tls_exchange(port, client_context(good, good.roots)) == b"ping"
        lines = await wait_for_log(tmp_path / "access.log", lambda lines: len(lines) == 2, "2")
    assert [line["decision"] for line in lines] == ["error", "allow"]
    assert lines[0]["reason"] == "not ready: no certificate from the agent yet"


async def test_a_failing_application_gets_the_client_a_clean_close_and_a_reason(
    ca: LocalCA, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{dead_port}",))
    async with proxy(cfg, await store_for(ca, BACKEND)) as running:
        await running.wait_ready()
        good = identity_files(ca, tmp_path, FRONTEND)
        assert await tls_exchange(running.ports[LISTEN], client_context(good, good.roots)) == b""
        (line,) = await wait_for_log(tmp_path / "access.log", lambda lines: len(lines) == 1, "1")
    assert line["decision"] == "error"
    assert line["peer_spiffe_id"] == str(FRONTEND)
    assert line["reason"] == f"upstream 127.0.0.1:{dead_port}: Connection refused"


async def test_outbound_refuses_a_server_with_another_spiffe_id_before_sending_a_byte(
    ca: LocalCA, echo: Echo, tmp_path: Path
) -> None:
    impostor_cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",), log_name="x.log")
    async with proxy(impostor_cfg, await store_for(ca, INTRUDER)) as impostor:
        await impostor.wait_ready()
        target = f"127.0.0.1:{impostor.ports[LISTEN]}"
        front_cfg = config(tmp_path, outbound=(f"{LISTEN}={target},{BACKEND}",), log_name="f.log")
        async with proxy(front_cfg, await store_for(ca, FRONTEND)) as front:
            await front.wait_ready()
            assert await plain_exchange(front.ports[LISTEN], b"card 4111") == b""
            (line,) = await wait_for_log(tmp_path / "f.log", lambda lines: len(lines) == 1, "1")
        (seen,) = await wait_for_log(tmp_path / "x.log", lambda lines: len(lines) == 1, "1")
    assert line["decision"] == "deny"
    assert line["reason"] == f"the server is {INTRUDER}; expected: {BACKEND}"
    assert line["bytes_received"] == 0
    assert seen["peer_spiffe_id"] == str(FRONTEND)
    assert seen["bytes_received"] == 0, "no byte of the application may reach the wrong server"


async def test_outbound_to_a_remote_that_is_down_closes_the_app_cleanly(
    ca: LocalCA, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    cfg = config(tmp_path, outbound=(f"{LISTEN}=127.0.0.1:{dead_port},{BACKEND}",))
    async with proxy(cfg, await store_for(ca, FRONTEND)) as running:
        await running.wait_ready()
        # A clean close (FIN, no reset): plain_exchange raises on a reset.
        assert await plain_exchange(running.ports[LISTEN], b"anyone there?") == b""
        (line,) = await wait_for_log(tmp_path / "access.log", lambda lines: len(lines) == 1, "1")
    assert line["direction"] == "outbound" and line["decision"] == "error"
    assert line["reason"] == f"upstream 127.0.0.1:{dead_port}: Connection refused"
    assert line["app_address"] == "127.0.0.1" and line["bytes_sent"] == 0


async def test_outbound_refuses_the_expected_id_under_a_root_outside_the_bundle(
    ca: LocalCA, echo: Echo, tmp_path: Path
) -> None:
    """A server that presents exactly the expected SPIFFE ID, issued by a CA whose root
    is not in our bundle (another deployment naming itself cluster.local), is refused by
    the chain check before a byte of the application is sent."""
    rogue = LocalCA()  # same trust domain name, another root
    impostor_cfg = config(tmp_path, inbound=(f"{LISTEN}=127.0.0.1:{echo.port}",), log_name="x.log")
    async with proxy(impostor_cfg, await store_for(rogue, BACKEND)) as impostor:
        await impostor.wait_ready()
        target = f"127.0.0.1:{impostor.ports[LISTEN]}"
        front_cfg = config(tmp_path, outbound=(f"{LISTEN}={target},{BACKEND}",), log_name="f.log")
        async with proxy(front_cfg, await store_for(ca, FRONTEND)) as front:
            await front.wait_ready()
            assert await plain_exchange(front.ports[LISTEN], b"card 4111") == b""
            (line,) = await wait_for_log(tmp_path / "f.log", lambda lines: len(lines) == 1, "1")
    assert line["decision"] == "deny"
    assert line["reason"] == "certificate verify failed: unable to get local issuer certificate"
    assert line["peer_spiffe_id"] is None and line["bytes_received"] == 0
    assert echo.accepted == 0, "no byte of the application may reach the impostor"
