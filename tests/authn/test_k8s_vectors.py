"""The named bad-token corpus in tests/vectors/tokens (see its README.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from freezegun import freeze_time

from meshca.authn.k8s import KubernetesAuthenticator
from meshca.config import JwtCluster
from meshca.errors import AuthenticationError
from tests.authn.conftest import (
    PEER,
    REVIEWER_TOKEN,
    MakeAuthenticator,
    bearer,
    tokenreview_cluster,
)
from tests.fakes.kube import FakeKubeApi, SigningKey

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "tokens"
ISSUED_AT = datetime(2026, 1, 1, tzinfo=UTC)  # make_vectors.NOW
ISSUER = (VECTORS / "issuer.txt").read_text().strip()

JWT_REASONS = {
    "token-alg-none.jwt": "bad_algorithm",
    "token-hs256-signed-with-public-key.jwt": "bad_algorithm",
    "token-expired.jwt": "token_expired",
    "token-not-yet-valid.jwt": "token_not_yet_valid",
    "token-iat-in-future.jwt": "token_not_yet_valid",
    "token-wrong-audience.jwt": "wrong_audience",
    "token-wrong-issuer.jwt": "wrong_issuer",
    "token-unknown-kid.jwt": "unknown_key",
    "token-other-cluster.jwt": "unknown_key",
    "token-other-key-same-kid.jwt": "bad_signature",
    "token-tampered-payload.jwt": "bad_signature",
    "token-missing-exp.jwt": "missing_claims",
    "token-missing-kubernetes-claims.jwt": "missing_claims",
    "token-sub-mismatch.jwt": "inconsistent_claims",
    "token-namespace-with-slash.jwt": "invalid_identity",
    "token-not-a-jwt.jwt": "malformed_token",
}
"""Every bad token and the reason ``jwt`` mode must give."""

REVIEW_REASONS = {
    **{
        name: "token_rejected"
        for name in (
            "token-alg-none.jwt",
            "token-hs256-signed-with-public-key.jwt",
            "token-expired.jwt",
            "token-not-yet-valid.jwt",
            "token-iat-in-future.jwt",
            "token-wrong-audience.jwt",
            "token-wrong-issuer.jwt",
            "token-unknown-kid.jwt",
            "token-other-cluster.jwt",
            "token-other-key-same-kid.jwt",
            "token-tampered-payload.jwt",
            "token-missing-kubernetes-claims.jwt",
            "token-not-a-jwt.jwt",
        )
    },
    "token-namespace-with-slash.jwt": "invalid_identity",
}
"""What ``tokenreview`` mode gives when the API server holds the corpus signing key:
the API server says "not authenticated"; meshca still refuses a forged path."""


def _token(name: str) -> str:
    return (VECTORS / name).read_text().strip()


@pytest.fixture
def frozen() -> Iterator[None]:
    with freeze_time(ISSUED_AT, real_asyncio=True):
        yield


@pytest.fixture
async def corpus_auth(make_authenticator: MakeAuthenticator) -> KubernetesAuthenticator:
    return make_authenticator(
        JwtCluster(cluster_id="home", issuer=ISSUER, jwks_file=VECTORS / "jwks.json"),
        JwtCluster(
            cluster_id="other", issuer=ISSUER, jwks_file=VECTORS / "jwks-other-cluster.json"
        ),
    )


def test_every_vector_has_an_expected_reason() -> None:
    on_disk = {p.name for p in VECTORS.glob("*.jwt")} - {"token-valid.jwt"}
    assert on_disk == set(JWT_REASONS)
    readme = (VECTORS / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in on_disk)


async def test_control_token_is_accepted(
    frozen: None, corpus_auth: KubernetesAuthenticator
) -> None:
    attestation = await corpus_auth.authenticate(bearer(_token("token-valid.jwt")), PEER)
    assert str(attestation.spiffe_id) == "spiffe://cluster.local/ns/default/sa/httpbin"
    assert attestation.expires_at == datetime(2026, 1, 1, 1, tzinfo=UTC)
    assert "k8s:pod-name:httpbin-6d4cf56db6-x7k2p" in attestation.selectors


@pytest.mark.parametrize(("name", "reason"), sorted(JWT_REASONS.items()))
async def test_jwt_mode_refuses_vector(
    frozen: None, corpus_auth: KubernetesAuthenticator, name: str, reason: str
) -> None:
    token = _token(name)
    with pytest.raises(AuthenticationError) as info:
        await corpus_auth.authenticate(bearer(token), PEER)
    assert info.value.reason == reason, info.value.message
    assert token not in info.value.message


async def test_other_cluster_token_is_accepted_by_its_own_cluster(
    frozen: None, corpus_auth: KubernetesAuthenticator
) -> None:
    token = _token("token-other-cluster.jwt")
    attestation = await corpus_auth.authenticate(bearer(token, "other"), PEER)
    assert "k8s:cluster:other" in attestation.selectors


@pytest.fixture
async def corpus_kube() -> AsyncIterator[FakeKubeApi]:
    """A fake API server holding the corpus signing key, at the corpus's issuer."""
    key = serialization.load_pem_private_key(
        (VECTORS / "signing-key.pem").read_bytes(), password=None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    keys = [SigningKey.from_private_key(key)]
    async with FakeKubeApi(issuer=ISSUER, keys=keys, expected_bearer=REVIEWER_TOKEN) as kube:
        yield kube


@pytest.mark.parametrize(("name", "reason"), sorted(REVIEW_REASONS.items()))
async def test_tokenreview_mode_refuses_vector(
    frozen: None,
    corpus_kube: FakeKubeApi,
    make_authenticator: MakeAuthenticator,
    credentials_file: Path,
    name: str,
    reason: str,
) -> None:
    auth = make_authenticator(tokenreview_cluster(corpus_kube, credentials_file))
    with pytest.raises(AuthenticationError) as info:
        await auth.authenticate(bearer(_token(name)), PEER)
    assert info.value.reason == reason, info.value.message
    accepted = await auth.authenticate(bearer(_token("token-valid.jwt")), PEER)
    assert str(accepted.spiffe_id).endswith("/ns/default/sa/httpbin")
