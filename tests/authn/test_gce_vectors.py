"""The named bad-token corpus in tests/vectors/gce (see its README.md): each refused with
its own reason by the authenticator, and by a running CA, which counts it in metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from freezegun import freeze_time

from meshca.authn.base import Credential, Peer
from meshca.authn.gce import GceAuthenticator
from meshca.config import load_settings
from meshca.errors import AuthenticationError
from meshca.server import start_server
from meshca.store import Store
from tests.fakes.gce import FakeGoogleCerts, GoogleKey
from tests.support import create_certificate, make_csr

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "gce"
ISSUED_AT = datetime(2026, 1, 1, tzinfo=UTC)  # make_vectors.NOW
PEER = Peer("10.132.0.9:40022")

ACCEPTED = {
    "token-valid.jwt": "spiffe://cluster.local/ns/vms/sa/web",
    "token-valid-bare-issuer.jwt": "spiffe://cluster.local/ns/vms/sa/web",
    "token-valid-db-vm.jwt": "spiffe://cluster.local/ns/vms/sa/db",
}

REASONS = {
    "token-wrong-audience.jwt": "wrong_audience",
    "token-wrong-issuer.jwt": "wrong_issuer",
    "token-expired.jwt": "token_expired",
    "token-iat-in-future.jwt": "token_not_yet_valid",
    "token-missing-iat.jwt": "missing_claims",
    "token-unknown-kid.jwt": "unknown_key",
    "token-other-key-same-kid.jwt": "bad_signature",
    "token-tampered-payload.jwt": "bad_signature",
    "token-alg-none.jwt": "bad_algorithm",
    "token-hs256-signed-with-public-key.jwt": "bad_algorithm",
    "token-alg-rs512.jwt": "bad_algorithm",
    "token-project-not-allowed.jwt": "project_not_allowed",
    "token-no-mapping-rule.jwt": "no_mapping_rule",
    "token-email-not-verified.jwt": "no_mapping_rule",
    "token-format-standard.jwt": "standard_format_token",
    "token-missing-google-claim.jwt": "missing_google_claims",
    "token-google-claim-without-compute-engine.jwt": "missing_google_claims",
    "token-invalid-instance-name.jwt": "invalid_google_claims",
    "token-oversize.jwt": "token_too_large",
    "token-padded-signature.jwt": "malformed_token",
    "token-not-a-jwt.jwt": "malformed_token",
}
"""Every bad token and the reason it must be refused with."""

THROUGH_THE_API = {
    **REASONS,
    # The CA routes by the (unverified) issuer: these never reach the GCE path, and the
    # Kubernetes path (no cluster configured here) refuses them.
    "token-wrong-issuer.jwt": "no_authenticator",
    "token-not-a-jwt.jwt": "no_authenticator",
}


def _token(name: str) -> str:
    return (VECTORS / name).read_text().strip()


@pytest.fixture
def frozen() -> Iterator[None]:
    with freeze_time(ISSUED_AT, real_asyncio=True):
        yield


@pytest.fixture
async def google() -> AsyncIterator[FakeGoogleCerts]:
    """Google's certificate endpoint publishing the corpus key (jwks.json)."""
    key = serialization.load_pem_private_key(
        (VECTORS / "google-key.pem").read_bytes(), password=None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    async with FakeGoogleCerts([GoogleKey.from_private_key(key)]) as certs:
        yield certs


@pytest.fixture
async def corpus_auth(google: FakeGoogleCerts, tmp_path: Path) -> AsyncIterator[GceAuthenticator]:
    settings = load_settings(VECTORS / "meshca.yaml", state_dir=tmp_path, gce_certs_url=google.url)
    assert settings.gce is not None
    store = Store.open(settings.effective_database_url)
    auth = GceAuthenticator(settings.trust_domain_value, settings.gce, store)
    yield auth
    await auth.close()
    store.close()


def test_every_vector_has_an_expected_outcome_and_a_readme_line() -> None:
    on_disk = {p.name for p in VECTORS.glob("*.jwt")}
    assert on_disk == set(REASONS) | set(ACCEPTED)
    readme = (VECTORS / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in on_disk)
    assert len(set(REASONS.values())) >= 14


def test_the_fake_publishes_the_corpus_key_set() -> None:
    key = serialization.load_pem_private_key(
        (VECTORS / "google-key.pem").read_bytes(), password=None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    published = json.loads((VECTORS / "jwks.json").read_text())
    assert published == {"keys": [GoogleKey.from_private_key(key).public_jwk()]}


@pytest.mark.parametrize(("name", "spiffe_id"), sorted(ACCEPTED.items()))
async def test_control_tokens_are_accepted(
    frozen: None, corpus_auth: GceAuthenticator, name: str, spiffe_id: str
) -> None:
    attestation = await corpus_auth.authenticate(Credential(bearer_token=_token(name)), PEER)
    assert str(attestation.spiffe_id) == spiffe_id
    assert attestation.expires_at == datetime(2026, 1, 1, 1, tzinfo=UTC)
    assert "gce:project-id:meshca-vms" in attestation.selectors


@pytest.mark.parametrize(("name", "reason"), sorted(REASONS.items()))
async def test_vector_is_refused_with_its_reason(
    frozen: None, corpus_auth: GceAuthenticator, name: str, reason: str
) -> None:
    token = _token(name)
    with pytest.raises(AuthenticationError) as info:
        await corpus_auth.authenticate(Credential(bearer_token=token), PEER)
    assert info.value.reason == reason, info.value.message
    assert token not in info.value.message
    # A refused token is not consumed: the control still gets through afterwards.
    accepted = await corpus_auth.authenticate(
        Credential(bearer_token=_token("token-valid-db-vm.jwt")), PEER
    )
    assert accepted.spiffe_id is not None


async def test_a_running_ca_refuses_each_vector_and_counts_its_reason(
    google: FakeGoogleCerts, tmp_path: Path
) -> None:
    settings = load_settings(
        VECTORS / "meshca.yaml",
        state_dir=tmp_path,
        gce_certs_url=google.url,
        plaintext=True,
        grpc_listen="127.0.0.1:0",
        grpc_mtls_listen="off",
        http_listen="127.0.0.1:0",
        rate_limit_per_peer="off",
    )
    # Plaintext: no TLS handshake to check certificates against the real clock; gRPC
    # computes deadlines on the real clock too.
    with freeze_time(ISSUED_AT, real_asyncio=True, ignore=["grpc"]):
        server = await start_server(settings)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        try:
            _, csr = make_csr(None)
            for name in sorted(THROUGH_THE_API):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await create_certificate(channel, csr, token=_token(name))
                assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED, name
            chain = await create_certificate(channel, csr, token=_token("token-valid.jwt"))
        finally:
            await channel.close()
            await server.stop(grace=0)
    assert len(chain) == 3
    text = server.metrics.exposition().decode()
    counts: dict[str, int] = {}
    for reason in THROUGH_THE_API.values():
        counts[reason] = counts.get(reason, 0) + 1
    for reason, count in counts.items():
        line = f'meshca_authentication_failures_total{{reason="{reason}"}} {count}.0'
        assert line in text, line
