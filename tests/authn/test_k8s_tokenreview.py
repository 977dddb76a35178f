"""``tokenreview`` mode: the cluster's API server judges the token (TokenReview v1)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from freezegun import freeze_time

from meshca.authn._cache import VerifiedTokenCache
from meshca.authn._jwks import ServiceAccountIdentity
from meshca.authn.base import AuthMethod
from meshca.errors import AuthenticationError
from tests.authn.conftest import (
    PEER,
    REVIEWER_TOKEN,
    MakeAuthenticator,
    bearer,
    reviewer,
    tokenreview_cluster,
)
from tests.fakes.kube import FakeKubeApi

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def _refused(call: Any, reason: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        await call
    assert info.value.reason == reason, info.value.message
    return info.value


async def test_good_token(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, credentials_file: Path
) -> None:
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file, audiences=["istio-ca"]))
    token = kube.mint_token("prod", "httpbin", pod_name="httpbin-1", pod_uid="uid-1")
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]

    attestation = await auth.authenticate(bearer(token), PEER)

    assert str(attestation.spiffe_id) == "spiffe://cluster.local/ns/prod/sa/httpbin"
    assert attestation.method is AuthMethod.K8S_TOKEN_REVIEW
    assert attestation.selectors == (
        "k8s:cluster:Kubernetes",
        "k8s:ns:prod",
        "k8s:sa:httpbin",
        "k8s:pod-name:httpbin-1",
        "k8s:pod-uid:uid-1",
    )
    assert attestation.expires_at == datetime.fromtimestamp(exp, UTC)
    # What went over the wire: meshca's own credential and the audiences it expects.
    assert kube.last_authorization == f"Bearer {REVIEWER_TOKEN}"
    assert kube.last_review_request is not None
    assert kube.last_review_request["spec"]["audiences"] == ["istio-ca"]


async def test_credentials_file_is_reread_on_every_call(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, credentials_file: Path
) -> None:
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file))
    await auth.authenticate(bearer(kube.mint_token("a", "one")), PEER)
    credentials_file.write_text("rotated-reviewer-token")
    kube.expected_bearer = "rotated-reviewer-token"
    await auth.authenticate(bearer(kube.mint_token("a", "two")), PEER)
    assert kube.last_authorization == "Bearer rotated-reviewer-token"


async def test_api_server_refusing_meshca_is_not_blamed_on_the_token(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    auth = make_authenticator(tokenreview_cluster(kube, None))  # no credentials_file
    error = await _refused(
        auth.authenticate(bearer(kube.mint_token()), PEER), "tokenreview_unavailable"
    )
    assert kube.last_authorization is None
    assert "HTTP 401" in error.message and "meshca's own credentials" in error.message


async def test_positive_results_are_cached_by_hash(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, credentials_file: Path
) -> None:
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file))
    token = kube.mint_token("prod", "web")
    first = await auth.authenticate(bearer(token), PEER)
    second = await auth.authenticate(bearer(token), PEER)
    assert first == second
    assert kube.tokenreview_calls == 1

    keys = list(reviewer(auth).cache.keys())
    assert keys == [hashlib.sha256(token.encode()).hexdigest()]
    assert token not in keys and all(token not in key for key in keys)


async def test_cache_expires_after_cache_ttl(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, credentials_file: Path
) -> None:
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file, cache_ttl="60s"))
    with freeze_time(T0, real_asyncio=True) as clock:
        token = kube.mint_token(ttl=timedelta(hours=1))
        await auth.authenticate(bearer(token), PEER)
        clock.tick(timedelta(seconds=59))
        await auth.authenticate(bearer(token), PEER)
        assert kube.tokenreview_calls == 1
        clock.tick(timedelta(seconds=2))
        await auth.authenticate(bearer(token), PEER)
        assert kube.tokenreview_calls == 2


async def test_cache_never_outlives_the_token(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, credentials_file: Path
) -> None:
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file, cache_ttl="10m"))
    with freeze_time(T0, real_asyncio=True) as clock:
        token = kube.mint_token(ttl=timedelta(seconds=30))
        await auth.authenticate(bearer(token), PEER)
        clock.tick(timedelta(seconds=20))
        await auth.authenticate(bearer(token), PEER)
        assert kube.tokenreview_calls == 1
        clock.tick(timedelta(seconds=11))  # past exp, well inside cache_ttl
        error = await _refused(auth.authenticate(bearer(token), PEER), "token_rejected")
        assert "expired" in error.message
        assert kube.tokenreview_calls == 2


async def test_refusals_are_never_cached(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, credentials_file: Path
) -> None:
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file))
    token = kube.mint_token()
    kube.force_unauthenticated = "[invalid bearer token, token lookup failed]"
    for _ in range(2):
        error = await _refused(auth.authenticate(bearer(token), PEER), "token_rejected")
        assert "token lookup failed" in error.message
    assert len(reviewer(auth).cache) == 0
    kube.force_unauthenticated = None
    await auth.authenticate(bearer(token), PEER)
    assert kube.tokenreview_calls == 3


def test_cache_is_bounded_and_evicts_the_oldest() -> None:
    cache = VerifiedTokenCache(max_entries=3)
    identity = ServiceAccountIdentity("ns", "sa")
    for n in range(4):
        cache.put(f"token-{n}", identity, until=100.0)
    assert len(cache) == 3
    assert cache.get("token-0", now=0.0) is None
    assert cache.get("token-3", now=0.0) == identity
    assert cache.get("token-3", now=100.0) is None  # expired entries are dropped


@pytest.mark.parametrize("status", [500, 503, 404])
async def test_api_server_errors_are_unavailable(
    kube: FakeKubeApi,
    make_authenticator: MakeAuthenticator,
    credentials_file: Path,
    status: int,
) -> None:
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file))
    kube.fail_tokenreview = status
    error = await _refused(
        auth.authenticate(bearer(kube.mint_token()), PEER), "tokenreview_unavailable"
    )
    assert "could not be reached" in error.message and f"HTTP {status}" in error.message
    assert "not judged" in error.message


async def test_api_server_down_is_unavailable(
    make_authenticator: MakeAuthenticator, credentials_file: Path
) -> None:
    kube = FakeKubeApi(expected_bearer=REVIEWER_TOKEN)
    await kube.start()
    token = kube.mint_token()
    await kube.stop()  # nothing listens on the port any more
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file))
    error = await _refused(auth.authenticate(bearer(token), PEER), "tokenreview_unavailable")
    assert "could not be reached" in error.message


async def test_api_server_timeout_is_unavailable(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, credentials_file: Path
) -> None:
    kube.delay = 2.0
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file, timeout="200ms"))
    await _refused(auth.authenticate(bearer(kube.mint_token()), PEER), "tokenreview_unavailable")


async def test_token_for_another_audience_is_refused_by_the_api_server(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, credentials_file: Path
) -> None:
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file))
    token = kube.mint_token(audiences=[kube.issuer])
    error = await _refused(auth.authenticate(bearer(token), PEER), "token_rejected")
    assert "audiences" in error.message


async def test_audience_not_echoed_is_refused(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, credentials_file: Path
) -> None:
    """An audience-unaware reviewer (no status.audiences) must not be trusted."""
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file))
    kube.status_hook = lambda status: status.pop("audiences")
    error = await _refused(auth.authenticate(bearer(kube.mint_token()), PEER), "wrong_audience")
    assert "istio-ca" in error.message
    kube.status_hook = lambda status: status.update(audiences=["vault"])
    await _refused(auth.authenticate(bearer(kube.mint_token()), PEER), "wrong_audience")


async def test_user_outside_the_service_accounts_group_is_refused(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, credentials_file: Path
) -> None:
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file))
    kube.status_hook = lambda status: status["user"].update(groups=["system:authenticated"])
    await _refused(auth.authenticate(bearer(kube.mint_token()), PEER), "not_a_service_account")


@pytest.mark.parametrize(
    "username",
    ["system:node:worker-1", "system:serviceaccount:default", "alice", "system:serviceaccount::x"],
)
async def test_user_name_must_be_a_service_account(
    kube: FakeKubeApi,
    make_authenticator: MakeAuthenticator,
    credentials_file: Path,
    username: str,
) -> None:
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file))
    kube.status_hook = lambda status: status["user"].update(username=username)
    await _refused(auth.authenticate(bearer(kube.mint_token()), PEER), "not_a_service_account")


async def test_ambiguous_pod_extras_are_left_out(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, credentials_file: Path
) -> None:
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file))

    def two_pods(status: dict[str, Any]) -> None:
        status["user"]["extra"]["authentication.kubernetes.io/pod-name"] = ["a", "b"]

    kube.status_hook = two_pods
    attestation = await auth.authenticate(bearer(kube.mint_token("ns", "sa")), PEER)
    assert not any(s.startswith("k8s:pod-name:") for s in attestation.selectors)
    assert any(s.startswith("k8s:pod-uid:") for s in attestation.selectors)


async def test_https_api_server_verified_with_ca_file(
    make_authenticator: MakeAuthenticator, credentials_file: Path, tmp_path: Path
) -> None:
    async with FakeKubeApi(expected_bearer=REVIEWER_TOKEN, tls_dir=tmp_path / "tls") as kube:
        trusted = make_authenticator(
            tokenreview_cluster(kube, credentials_file, ca_file=kube.ca_file)
        )
        attestation = await trusted.authenticate(bearer(kube.mint_token("a", "b")), PEER)
        assert str(attestation.spiffe_id).endswith("/ns/a/sa/b")

        untrusted = make_authenticator(tokenreview_cluster(kube, credentials_file))
        error = await _refused(
            untrusted.authenticate(bearer(kube.mint_token("a", "b")), PEER),
            "tokenreview_unavailable",
        )
        assert "certificate" in error.message.lower()
        assert kube.tokenreview_calls == 1  # the handshake failed before any request
