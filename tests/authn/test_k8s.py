"""KubernetesAuthenticator: cluster selection, bearer-token checks, identity, logging."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from meshca.authn.base import Attestation, Authenticator
from meshca.authn.k8s import MAX_TOKEN_BYTES, KubernetesAuthenticator
from meshca.config import JwtCluster, TokenReviewCluster
from meshca.errors import AuthenticationError, ConfigError
from tests.authn.conftest import (
    PEER,
    REVIEWER_TOKEN,
    MakeAuthenticator,
    bearer,
    jwt_cluster,
    tokenreview_cluster,
)
from tests.conftest import TRUST_DOMAIN
from tests.fakes.kube import FakeKubeApi


async def _refused(call: Any, reason: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        await call
    assert info.value.reason == reason, info.value.message
    return info.value


@pytest.fixture
async def east() -> Any:
    async with FakeKubeApi(expected_bearer=REVIEWER_TOKEN) as api:
        yield api


def test_is_an_authenticator() -> None:
    cluster = JwtCluster(issuer="https://issuer.example", jwks_url="https://issuer.example/k")
    auth: Authenticator = KubernetesAuthenticator(TRUST_DOMAIN, [cluster])
    assert isinstance(auth, KubernetesAuthenticator)


async def test_clusters_are_selected_by_cluster_id(
    kube: FakeKubeApi,
    east: FakeKubeApi,
    make_authenticator: MakeAuthenticator,
    credentials_file: Path,
) -> None:
    auth = make_authenticator(
        jwt_cluster(kube, "west"), tokenreview_cluster(east, credentials_file, "east")
    )
    west_token, east_token = kube.mint_token("a", "w"), east.mint_token("a", "e")

    west = await auth.authenticate(bearer(west_token, "west"), PEER)
    east_attestation = await auth.authenticate(bearer(east_token, "east"), PEER)
    assert "k8s:cluster:west" in west.selectors and str(west.spiffe_id).endswith("/sa/w")
    assert "k8s:cluster:east" in east_attestation.selectors
    assert east.tokenreview_calls == 1

    # A token of one cluster presented to the other is refused by that cluster's rules.
    await _refused(auth.authenticate(bearer(east_token, "west"), PEER), "unknown_key")
    await _refused(auth.authenticate(bearer(west_token, "east"), PEER), "token_rejected")


async def test_unknown_cluster_is_refused_by_name(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    auth = make_authenticator(jwt_cluster(kube, "west"), jwt_cluster(kube, "east"))
    error = await _refused(
        auth.authenticate(bearer(kube.mint_token(), "north"), PEER), "unknown_cluster"
    )
    assert "'north'" in error.message and "west, east" in error.message
    assert kube.jwks_fetches == 0


async def test_no_cluster_header_goes_to_the_default_or_the_first(
    kube: FakeKubeApi, east: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    first = make_authenticator(jwt_cluster(kube, "west"), jwt_cluster(east, "east"))
    chosen = make_authenticator(
        jwt_cluster(kube, "west"), jwt_cluster(east, "east"), default_cluster="east"
    )
    attestation = await first.authenticate(bearer(kube.mint_token()), PEER)
    assert "k8s:cluster:west" in attestation.selectors
    attestation = await chosen.authenticate(bearer(east.mint_token()), PEER)
    assert "k8s:cluster:east" in attestation.selectors
    await _refused(chosen.authenticate(bearer(kube.mint_token()), PEER), "unknown_key")


@pytest.mark.parametrize("token", [None, ""])
async def test_missing_token(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, token: str | None
) -> None:
    auth = make_authenticator(jwt_cluster(kube))
    await _refused(auth.authenticate(bearer(token), PEER), "missing_token")


async def test_oversized_token_is_refused_unread(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, credentials_file: Path
) -> None:
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file))
    padded = kube.mint_token(claims={"padding": "x" * MAX_TOKEN_BYTES})
    error = await _refused(auth.authenticate(bearer(padded), PEER), "token_too_large")
    assert str(MAX_TOKEN_BYTES) in error.message
    assert kube.tokenreview_calls == 0


@pytest.mark.parametrize(
    "token", ["Bearer abc.def.ghi", "abc def", "tökén", "abc\n.def", "a=b", "abc\x00"]
)
async def test_characters_no_bearer_token_has_are_refused_unsent(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, credentials_file: Path, token: str
) -> None:
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file))
    await _refused(auth.authenticate(bearer(token), PEER), "malformed_token")
    assert kube.tokenreview_calls == 0


@pytest.mark.parametrize(
    ("namespace", "service_account"),
    [("prod/sa/admin", "x"), ("..", "sa"), ("ns", "a b"), ("ns", "sa%2f")],
)
async def test_names_that_are_not_spiffe_path_segments_are_refused(
    kube: FakeKubeApi,
    make_authenticator: MakeAuthenticator,
    credentials_file: Path,
    namespace: str,
    service_account: str,
) -> None:
    """A '/' in a name must not become extra SPIFFE path segments (SPIFFE-ID 2.2)."""
    jwt_auth = make_authenticator(jwt_cluster(kube))
    review_auth = make_authenticator(tokenreview_cluster(kube, credentials_file))
    token = kube.mint_token(namespace, service_account)
    for auth in (jwt_auth, review_auth):
        await _refused(auth.authenticate(bearer(token), PEER), "invalid_identity")


async def test_odd_pod_names_are_left_out_of_the_selectors(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    auth = make_authenticator(jwt_cluster(kube))
    token = kube.mint_token("ns", "sa", pod_name="web,k8s:ns:kube-system", pod_uid="u-1")
    attestation: Attestation = await auth.authenticate(bearer(token), PEER)
    assert attestation.selectors == (
        "k8s:cluster:Kubernetes",
        "k8s:ns:ns",
        "k8s:sa:sa",
        "k8s:pod-uid:u-1",
    )


def test_configuration_is_checked_at_construction(tmp_path: Path) -> None:
    cluster = JwtCluster(issuer="https://i.example", jwks_url="https://i.example/keys")
    with pytest.raises(ConfigError, match="no Kubernetes clusters"):
        KubernetesAuthenticator(TRUST_DOMAIN, [])
    with pytest.raises(ConfigError, match="unique"):
        KubernetesAuthenticator(TRUST_DOMAIN, [cluster, cluster])
    with pytest.raises(ConfigError, match="'nope' is not among"):
        KubernetesAuthenticator(TRUST_DOMAIN, [cluster], default_cluster="nope")
    missing = TokenReviewCluster(api_server="https://k.example", ca_file=tmp_path / "no-ca.pem")
    with pytest.raises(ConfigError, match=r"no-ca\.pem"):
        KubernetesAuthenticator(TRUST_DOMAIN, [missing])


async def test_close_is_idempotent_and_sessions_reopen(
    kube: FakeKubeApi, credentials_file: Path
) -> None:
    auth = KubernetesAuthenticator(
        TRUST_DOMAIN, [tokenreview_cluster(kube, credentials_file), jwt_cluster(kube, "jwt")]
    )
    await auth.authenticate(bearer(kube.mint_token()), PEER)
    await auth.close()
    await auth.close()
    await auth.authenticate(bearer(kube.mint_token("a", "b")), PEER)
    await auth.close()
    assert auth.cluster_ids == ("Kubernetes", "jwt")


async def test_refusals_are_logged_with_the_reason_never_the_token(
    kube: FakeKubeApi,
    make_authenticator: MakeAuthenticator,
    credentials_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    auth = make_authenticator(
        tokenreview_cluster(kube, credentials_file, "review"), jwt_cluster(kube, "jwt")
    )
    caplog.set_level(logging.DEBUG, logger="meshca")
    expired = kube.mint_token(ttl=-timedelta(hours=1))
    tokens = [expired, kube.mint_token(audiences=["vault"])]
    for token in tokens:
        for cluster in ("review", "jwt"):
            with pytest.raises(AuthenticationError):
                await auth.authenticate(bearer(token, cluster), PEER)
    good = kube.mint_token()
    await auth.authenticate(bearer(good, "review"), PEER)
    refusals = [r for r in caplog.records if r.levelno == logging.INFO and "refused" in r.message]
    assert len(refusals) == 4
    assert all(PEER.address in r.message and "reason=" in r.message for r in refusals)
    for token in [*tokens, good]:
        assert all(token not in r.getMessage() for r in caplog.records)
        assert all(token.split(".")[2] not in r.getMessage() for r in caplog.records)
