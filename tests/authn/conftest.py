"""Fixtures for authenticator tests: fake Kubernetes API servers on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from meshca.authn._tokenreview import TokenReviewer
from meshca.authn.base import Credential, Peer
from meshca.authn.k8s import KubernetesAuthenticator
from meshca.config import JwtCluster, TokenReviewCluster
from tests.conftest import TRUST_DOMAIN
from tests.fakes.kube import FakeKubeApi

REVIEWER_TOKEN = "meshca-reviewer-token"
PEER = Peer("10.244.1.17:41234")

MakeAuthenticator = Callable[..., KubernetesAuthenticator]


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubeApi]:
    """A plain-HTTP fake API server whose issuer is its own URL (OIDC discovery works)."""
    async with FakeKubeApi(expected_bearer=REVIEWER_TOKEN) as api:
        yield api


@pytest.fixture
def credentials_file(tmp_path: Path) -> Path:
    path = tmp_path / "reviewer-token"
    path.write_text(REVIEWER_TOKEN + "\n")
    return path


@pytest.fixture
async def make_authenticator() -> AsyncIterator[MakeAuthenticator]:
    """Build KubernetesAuthenticators for the test; all are closed at teardown."""
    made: list[KubernetesAuthenticator] = []

    def make(
        *clusters: TokenReviewCluster | JwtCluster, default_cluster: str | None = None
    ) -> KubernetesAuthenticator:
        auth = KubernetesAuthenticator(TRUST_DOMAIN, clusters, default_cluster=default_cluster)
        made.append(auth)
        return auth

    yield make
    for auth in made:
        await auth.close()


def jwt_cluster(kube: FakeKubeApi, cluster_id: str = "Kubernetes", **fields: Any) -> JwtCluster:
    """A ``jwt`` cluster trusting ``kube``'s issuer (OIDC discovery unless overridden)."""
    fields.setdefault("issuer", kube.issuer)
    return JwtCluster(cluster_id=cluster_id, **fields)


def tokenreview_cluster(
    kube: FakeKubeApi, credentials: Path | None, cluster_id: str = "Kubernetes", **fields: Any
) -> TokenReviewCluster:
    return TokenReviewCluster(
        cluster_id=cluster_id, api_server=kube.url, credentials_file=credentials, **fields
    )


def bearer(token: str | None, cluster_id: str | None = None) -> Credential:
    return Credential(bearer_token=token, cluster_id=cluster_id)


def reviewer(auth: KubernetesAuthenticator, cluster_id: str = "Kubernetes") -> TokenReviewer:
    """The TokenReview validator behind ``cluster_id`` (to inspect its cache)."""
    validator = auth._validators[cluster_id]
    assert isinstance(validator, TokenReviewer)
    return validator
