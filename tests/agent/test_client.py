"""The agent's CA client against a real CA on loopback (and, for answers a real CA never
gives, a deliberately wrong CA speaking the same gRPC contract)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc import aio

from meshca.agent.client import CAClient, CAError, Issued
from meshca.agent.credential_sources import CredentialError, ProjectedTokenFile
from meshca.agent.credentials import CredentialStore, X509Credentials
from meshca.agent.rotation import Backoff, new_key_and_csr
from meshca.agent.run import build_client
from meshca.agent.trust import BundleFile, PinnedBundleUrl, TrustAnchors, TrustError
from meshca.api._proto import istioca_pb2, istioca_pb2_grpc
from meshca.pki import profile
from meshca.pki.keys import KeyAlgorithm, PublicKey
from meshca.spiffe import SpiffeId, TrustDomain
from tests.agent.conftest import CA, StartCA, settings_for, write_token
from tests.agent.support import TD, WEB, LocalCA
from tests.support import verify_with_cryptography

DB = TD.workload("default", "db")
PEM = serialization.Encoding.PEM


async def _issue(
    client: CAClient, expected: SpiffeId | None = None, svid: X509Credentials | None = None
) -> Issued:
    key, csr = new_key_and_csr(KeyAlgorithm.EC_P256, expected)
    return await client.create_certificate(
        csr, key.public_key(), ttl=timedelta(minutes=10), expected=expected, svid=svid
    )


@pytest.fixture
async def real_ca(start_ca: StartCA) -> CA:
    return await start_ca()


@pytest.fixture
async def client(real_ca: CA, tmp_path: Path) -> AsyncIterator[CAClient]:
    client = build_client(settings_for(real_ca, tmp_path, mtls_address=real_ca.mtls_address))
    yield client
    await client.close()


async def test_issues_with_the_projected_token_and_checks_the_answer(client: CAClient) -> None:
    key, csr = new_key_and_csr(KeyAlgorithm.EC_P256, None)
    issued = await client.create_certificate(
        csr, key.public_key(), ttl=timedelta(minutes=10), expected=None
    )
    assert issued.spiffe_id == WEB  # the CA decided the path from the token
    assert issued.via == "token"
    assert issued.leaf.public_key() == key.public_key()
    pems = [c.public_bytes(PEM).decode() for c in (*issued.chain, issued.root)]
    verify_with_cryptography(pems)
    assert client.anchors.current == (issued.root,)


async def test_token_file_is_read_again_for_every_request(
    client: CAClient, real_ca: CA, tmp_path: Path
) -> None:
    first = await _issue(client)
    write_token(tmp_path / "token", real_ca.kube, "db")  # the kubelet rotates the file
    second = await _issue(client)
    assert (first.spiffe_id, second.spiffe_id) == (WEB, DB)


async def test_missing_token_file_is_an_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "tokens" / "istio-token"
    with pytest.raises(CredentialError) as info:
        await ProjectedTokenFile(missing).token()
    assert str(missing) in info.value.message and "does not exist" in info.value.message
    assert info.value.reason == "token_unreadable"
    with pytest.raises(CredentialError, match="is a directory"):
        await ProjectedTokenFile(tmp_path).token()
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(CredentialError, match="is empty"):
        await ProjectedTokenFile(tmp_path / "empty").token()


async def test_renewal_with_the_svid_on_the_mtls_port(client: CAClient) -> None:
    key, csr = new_key_and_csr(KeyAlgorithm.EC_P256, None)
    first = await client.create_certificate(
        csr, key.public_key(), ttl=timedelta(minutes=10), expected=None
    )
    creds = await CredentialStore().publish(first.spiffe_id, key, first.chain, (first.root,))
    renewed = await _issue(client, WEB, svid=creds)
    assert renewed.via == "svid"
    assert renewed.spiffe_id == WEB


async def test_permission_denied_is_permanent_and_says_why(
    client: CAClient, real_ca: CA, tmp_path: Path
) -> None:
    write_token(tmp_path / "token", real_ca.kube, "db")
    with pytest.raises(CAError) as info:
        await _issue(client, WEB)  # a CSR for web, a token for db
    err = info.value
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and not err.retryable
    assert err.reason == "permission_denied"
    assert "CSR asks for the identity" in err.message and real_ca.address in err.message


async def test_unauthenticated_is_permanent(client: CAClient, real_ca: CA, tmp_path: Path) -> None:
    write_token(tmp_path / "token", real_ca.kube, audiences=["someone-else"])
    with pytest.raises(CAError) as info:
        await _issue(client)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and not info.value.retryable


async def test_resource_exhausted_carries_the_retry_hint(start_ca: StartCA, tmp_path: Path) -> None:
    ca = await start_ca(rate_limit_per_identity="1/minute")
    client = build_client(settings_for(ca, tmp_path))
    try:
        await _issue(client)
        with pytest.raises(CAError) as info:
            await _issue(client)
    finally:
        await client.close()
    err = info.value
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.retryable
    assert err.retry_after is not None and 50 < err.retry_after <= 60
    rng = random.Random(7)
    backoff = Backoff(timedelta(seconds=1), timedelta(seconds=30))
    assert all(backoff.delay(n, rng, hint=err.retry_after) >= err.retry_after for n in (1, 5, 20))


async def test_unreachable_ca_is_retryable(tmp_path: Path, start_ca: StartCA) -> None:
    ca = await start_ca()
    settings = settings_for(ca, tmp_path)
    await ca.stop()
    client = build_client(settings)
    try:
        with pytest.raises(CAError) as info:
            await _issue(client)
    finally:
        await client.close()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.retryable


async def test_bundle_url_is_accepted_only_with_a_pinned_root(real_ca: CA, tmp_path: Path) -> None:
    root = x509.load_pem_x509_certificate(real_ca.root_pem)
    pin = profile.fingerprint(root)
    good = PinnedBundleUrl(real_ca.bundle_url, [pin], TD, timedelta(seconds=5))
    assert await good.load() == (root,)
    bad = PinnedBundleUrl(real_ca.bundle_url, ["ab" * 32], TD, timedelta(seconds=5))
    with pytest.raises(TrustError) as info:
        await bad.load()
    assert info.value.reason == "bundle_pin_mismatch" and not info.value.retryable

    settings = settings_for(
        real_ca,
        tmp_path,
        ca_trust_bundle=None,
        ca_bundle_url=real_ca.bundle_url,
        ca_bundle_sha256=":".join(pin[i : i + 2].upper() for i in range(0, 64, 2)),
    )
    client = build_client(settings)
    try:
        assert (await _issue(client)).spiffe_id == WEB
    finally:
        await client.close()


# -- a CA that answers wrongly ---------------------------------------------------------

Answer = Callable[[PublicKey], list[str]]


class _WrongCA(istioca_pb2_grpc.IstioCertificateServiceServicer):  # type: ignore[misc]
    def __init__(self, answer: Answer) -> None:
        self.answer = answer

    async def CreateCertificate(  # noqa: N802
        self, request: istioca_pb2.IstioCertificateRequest, context: object
    ) -> istioca_pb2.IstioCertificateResponse:
        csr = x509.load_pem_x509_csr(request.csr.encode())
        key = csr.public_key()
        assert not isinstance(key, str)
        return istioca_pb2.IstioCertificateResponse(cert_chain=self.answer(key))  # type: ignore[arg-type]


def _pem(*certs: x509.Certificate) -> list[str]:
    return [c.public_bytes(PEM).decode() for c in certs]


def _leaf(ca: LocalCA, key: PublicKey, spiffe_id: SpiffeId) -> x509.Certificate:
    now = datetime.now(UTC)
    return profile.build_svid(
        ca.inter_key, ca.intermediate, key, spiffe_id, not_after=now + timedelta(hours=1), now=now
    )


@asynccontextmanager
async def wrong_ca(trusted: LocalCA, answer: Answer) -> AsyncIterator[str]:
    """A TLS server with a certificate from ``trusted`` answering with ``answer``."""
    server = aio.server()
    istioca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(_WrongCA(answer), server)
    key = KeyAlgorithm.EC_P256.generate()
    now = datetime.now(UTC)
    cert = profile.build_svid(
        trusted.inter_key,
        trusted.intermediate,
        key.public_key(),
        SpiffeId(TD, "/meshca"),
        not_after=now + timedelta(hours=1),
        now=now,
        dns_names=["localhost"],
    )
    key_pem = key.private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain_pem = cert.public_bytes(PEM) + trusted.intermediate.public_bytes(PEM)
    port = server.add_secure_port(
        "127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, chain_pem)])
    )
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


TRUSTED = LocalCA()
OTHER = LocalCA()
FOREIGN = LocalCA(trust_domain=TrustDomain("example.org"))

WRONG_ANSWERS: dict[str, tuple[Answer, SpiffeId | None, str]] = {
    "leaf-for-another-spiffe-id": (
        lambda k: _pem(_leaf(TRUSTED, k, DB), TRUSTED.intermediate, TRUSTED.root),
        WEB,
        "response_wrong_identity",
    ),
    "leaf-in-another-trust-domain": (
        lambda k: _pem(
            _leaf(FOREIGN, k, FOREIGN.trust_domain.workload("default", "web")),
            FOREIGN.intermediate,
            FOREIGN.root,
        ),
        None,
        "response_wrong_identity",
    ),
    "chain-not-to-the-bundle": (
        lambda k: _pem(_leaf(OTHER, k, WEB), OTHER.intermediate, OTHER.root),
        WEB,
        "response_untrusted",
    ),
    "other-ca-chain-ending-in-our-root": (
        lambda k: _pem(_leaf(OTHER, k, WEB), OTHER.intermediate, TRUSTED.root),
        WEB,
        "response_untrusted",
    ),
    "leaf-for-another-key": (
        lambda k: _pem(
            _leaf(TRUSTED, KeyAlgorithm.EC_P256.generate().public_key(), WEB),
            TRUSTED.intermediate,
            TRUSTED.root,
        ),
        WEB,
        "response_wrong_key",
    ),
    "no-root-last": (
        lambda k: _pem(_leaf(TRUSTED, k, WEB), TRUSTED.intermediate),
        WEB,
        "response_malformed",
    ),
    "leaf-only": (lambda k: _pem(_leaf(TRUSTED, k, WEB)), WEB, "response_malformed"),
    "two-certificates-in-one-entry": (
        lambda k: [
            "".join(_pem(_leaf(TRUSTED, k, WEB), TRUSTED.intermediate)),
            *_pem(TRUSTED.root),
        ],
        WEB,
        "response_malformed",
    ),
}


@pytest.mark.parametrize("case", sorted(WRONG_ANSWERS))
async def test_wrong_answers_are_refused(case: str, tmp_path: Path) -> None:
    answer, expected, reason = WRONG_ANSWERS[case]
    (tmp_path / "root.pem").write_bytes(TRUSTED.root.public_bytes(PEM))
    (tmp_path / "token").write_text("not-checked-by-this-ca")
    async with wrong_ca(TRUSTED, answer) as address:
        client = CAClient(
            address=address,
            anchors=TrustAnchors(BundleFile(tmp_path / "root.pem", TD), TD),
            credential=ProjectedTokenFile(tmp_path / "token"),
            server_name="localhost",
            timeout=timedelta(seconds=5),
        )
        try:
            with pytest.raises(CAError) as info:
                await _issue(client, expected)
        finally:
            await client.close()
    assert info.value.reason == reason, info.value.message
    assert not info.value.retryable
    assert info.value.message.startswith(f"refused the answer of the CA at {address}")


async def test_the_same_wrong_ca_answering_rightly_is_accepted(tmp_path: Path) -> None:
    """Control for the cases above: the harness itself is not what fails them."""
    (tmp_path / "root.pem").write_bytes(TRUSTED.root.public_bytes(PEM))
    (tmp_path / "token").write_text("not-checked-by-this-ca")

    def right(k: PublicKey) -> list[str]:
        return _pem(_leaf(TRUSTED, k, WEB), TRUSTED.intermediate, TRUSTED.root)

    async with wrong_ca(TRUSTED, right) as address:
        client = CAClient(
            address=address,
            anchors=TrustAnchors(BundleFile(tmp_path / "root.pem", TD), TD),
            credential=ProjectedTokenFile(tmp_path / "token"),
            server_name="localhost",
            timeout=timedelta(seconds=5),
        )
        try:
            assert (await _issue(client, WEB)).spiffe_id == WEB
        finally:
            await client.close()
