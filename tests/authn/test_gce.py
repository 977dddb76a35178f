"""GCE instance identity tokens, CA side: verification, key caching, mapping rules, routing.

Tokens come from the fake metadata server (through the agent's own metadata client) and
are signed by the fake Google certificate endpoint; used-token digests go to a real
Store on SQLite.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from freezegun import freeze_time
from freezegun.api import FrozenDateTimeFactory

from meshca.agent.credential_sources import GceMetadataServer
from meshca.api.grpc import status_for
from meshca.authn._gce_keys import MIN_KEYS_TTL, freshness_lifetime, keys_ttl
from meshca.authn.base import AuthMethod, Credential, Peer
from meshca.authn.gce import GceAuthenticator, is_google_token
from meshca.authn.k8s import KubernetesAuthenticator
from meshca.authn.svid import CallerAuthenticator, SvidAuthenticator
from meshca.config import GceConfig, GceRule, JwtCluster
from meshca.errors import AuthenticationError, StoreError
from meshca.store import Store
from tests.conftest import TRUST_DOMAIN
from tests.fakes.gce import (
    DEFAULT_RULES,
    WEB_ID,
    FakeGoogleCerts,
    FakeMetadataServer,
    GceVm,
    GoogleKey,
    identity_claims,
)
from tests.fakes.kube import FakeKubeApi

AUDIENCE = "spiffe://cluster.local"
PEER = Peer("10.128.0.7:50112")

MakeGce = Callable[..., GceAuthenticator]


@pytest.fixture
async def google() -> AsyncIterator[FakeGoogleCerts]:
    async with FakeGoogleCerts() as certs:
        yield certs


@pytest.fixture
async def metadata(google: FakeGoogleCerts) -> AsyncIterator[FakeMetadataServer]:
    async with FakeMetadataServer(google, GceVm()) as server:
        yield server


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(f"sqlite:///{tmp_path / 'meshca.db'}")
    yield opened
    opened.close()


@pytest.fixture
async def make_gce(google: FakeGoogleCerts, store: Store) -> AsyncIterator[MakeGce]:
    """GceAuthenticators against ``google`` (closed at teardown); fields override."""
    made: list[GceAuthenticator] = []

    def make(rules: list[dict[str, Any]] | None = None, **fields: Any) -> GceAuthenticator:
        trust_domain = fields.pop("trust_domain", TRUST_DOMAIN)
        config = GceConfig(
            projects=fields.pop("projects", ["meshca-vms"]),
            audience=fields.pop("audience", AUDIENCE),
            rules=[GceRule(**r) for r in (rules if rules is not None else DEFAULT_RULES)],
            certs_url=fields.pop("certs_url", google.url),
            **fields,
        )
        auth = GceAuthenticator(trust_domain, config, store)
        made.append(auth)
        return auth

    yield make
    for auth in made:
        await auth.close()


def bearer(token: str | None) -> Credential:
    return Credential(bearer_token=token)


async def refusal(auth: Any, token: str | None) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        await auth.authenticate(bearer(token), PEER)
    if token:
        assert token not in info.value.message
    return info.value


async def fetch(metadata: FakeMetadataServer, audience: str = AUDIENCE) -> str:
    return await GceMetadataServer(metadata.url).identity_token(audience)


# -- the happy path -----------------------------------------------------------------------


async def test_token_from_the_metadata_server_is_accepted(
    metadata: FakeMetadataServer, make_gce: MakeGce
) -> None:
    auth = make_gce()
    token = await fetch(metadata)
    attestation = await auth.authenticate(bearer(token), PEER)
    assert str(attestation.spiffe_id) == WEB_ID
    assert attestation.method is AuthMethod.GCE_IDENTITY
    assert attestation.selectors == (
        "gce:project-id:meshca-vms",
        "gce:project-number:123456789012",
        "gce:zone:europe-west1-b",
        "gce:instance-id:4613265537823984331",
        "gce:instance-name:web-1",
        "gce:service-account:web@meshca-vms.iam.gserviceaccount.com",
    )
    assert attestation.expires_at is not None
    left = attestation.expires_at - datetime.now(UTC)
    assert timedelta(minutes=59) < left <= timedelta(hours=1)
    assert metadata.last_query == {"audience": AUDIENCE, "format": "full"}


async def test_first_matching_rule_wins_and_templates_fill_in_the_vm(
    google: FakeGoogleCerts, make_gce: MakeGce
) -> None:
    auth = make_gce(
        [
            {"project": "meshca-vms", "zone": "us-*", "spiffe_id": "/never/us"},
            {
                "project": "meshca-vms",
                "zone": "europe-west1-?",
                "instance_name": "web-[0-9]",
                "service_account": "WEB@meshca-vms.iam.gserviceaccount.com",
                "spiffe_id": "spiffe://{trust_domain}/gce/{project_id}/{zone}/"
                "{instance_name}/{service_account_name}/{instance_id}",
            },
            {"project": "meshca-vms", "spiffe_id": "/too/late"},
        ]
    )
    token = google.mint(identity_claims(GceVm(), AUDIENCE))
    attestation = await auth.authenticate(bearer(token), PEER)
    assert str(attestation.spiffe_id) == (
        "spiffe://cluster.local/gce/meshca-vms/europe-west1-b/web-1/web/4613265537823984331"
    )


async def test_a_rule_naming_a_service_account_needs_that_verified_account(
    google: FakeGoogleCerts, make_gce: MakeGce
) -> None:
    auth = make_gce(
        [
            {
                "project": "meshca-vms",
                "service_account": "db@meshca-vms.iam.gserviceaccount.com",
                "spiffe_id": "/ns/vms/sa/db",
            },
            {"project": "meshca-vms", "spiffe_id": "/vm/{service_account_name}"},
        ]
    )
    no_sa = google.mint(identity_claims(GceVm(service_account=None), AUDIENCE))
    error = await refusal(auth, no_sa)
    assert error.reason == "no_mapping_rule"
    assert "instance 'web-1' (id 4613265537823984331, zone europe-west1-b)" in error.message
    assert "in project 'meshca-vms'" in error.message

    db = GceVm(service_account="db@meshca-vms.iam.gserviceaccount.com")
    attestation = await auth.authenticate(bearer(google.mint(identity_claims(db, AUDIENCE))), PEER)
    assert str(attestation.spiffe_id) == "spiffe://cluster.local/ns/vms/sa/db"
    web = await auth.authenticate(bearer(google.mint(identity_claims(GceVm(), AUDIENCE))), PEER)
    assert str(web.spiffe_id) == "spiffe://cluster.local/vm/web"


async def test_a_value_that_cannot_be_a_path_segment_is_refused(
    google: FakeGoogleCerts, make_gce: MakeGce
) -> None:
    auth = make_gce(
        [{"project": "example.com:scoped", "spiffe_id": "/gce/{project_id}"}],
        projects=["example.com:scoped"],
    )
    vm = GceVm(project_id="example.com:scoped")
    error = await refusal(auth, google.mint(identity_claims(vm, AUDIENCE)))
    assert error.reason == "invalid_identity"
    assert "{project_id} would be 'example.com:scoped'" in error.message


async def test_a_token_for_another_audience_names_the_expected_one(
    metadata: FakeMetadataServer, make_gce: MakeGce
) -> None:
    error = await refusal(make_gce(), await fetch(metadata, "https://other.example"))
    assert error.reason == "wrong_audience"
    assert repr(AUDIENCE) in error.message


async def test_a_standard_format_token_says_to_ask_for_format_full(
    google: FakeGoogleCerts, make_gce: MakeGce
) -> None:
    token = google.mint(identity_claims(GceVm(), AUDIENCE, full=False))
    error = await refusal(make_gce(), token)
    assert error.reason == "standard_format_token"
    assert "format=full" in error.message


async def test_a_database_outage_refuses_the_token_as_unavailable(
    google: FakeGoogleCerts, store: Store
) -> None:
    class DownLedger:
        def record_token_use(self, token_sha256: str, method: str, expires_at: datetime) -> bool:
            raise StoreError(
                "recording a token use failed: database is locked", reason="database_unavailable"
            )

        def purge_used_tokens(self, now: datetime) -> int:
            return 0

    config = GceConfig(
        projects=["meshca-vms"],
        audience=AUDIENCE,
        rules=[GceRule(**DEFAULT_RULES[0])],
        certs_url=google.url,
    )
    auth = GceAuthenticator(TRUST_DOMAIN, config, DownLedger())
    try:
        with pytest.raises(StoreError) as info:  # fail closed: never issue unrecorded
            await auth.authenticate(bearer(_mint(google)), PEER)
        assert status_for(info.value).name == "UNAVAILABLE"
    finally:
        await auth.close()


async def test_refusals_for_missing_or_oversize_tokens(make_gce: MakeGce) -> None:
    auth = make_gce()
    assert (await refusal(auth, None)).reason == "missing_token"
    assert (await refusal(auth, "a" * 9000)).reason == "token_too_large"


# -- Google's keys ------------------------------------------------------------------------


@pytest.fixture
def frozen() -> Iterator[FrozenDateTimeFactory]:
    with freeze_time(datetime.now(UTC), real_asyncio=True) as factory:
        yield factory


def _mint(google: FakeGoogleCerts, key: GoogleKey | None = None) -> str:
    return google.mint(identity_claims(GceVm(), AUDIENCE), key)


async def test_keys_are_cached_for_the_max_age_google_sends(
    frozen: FrozenDateTimeFactory, google: FakeGoogleCerts, make_gce: MakeGce
) -> None:
    google.max_age = 600
    auth = make_gce()
    await auth.authenticate(bearer(_mint(google)), PEER)
    frozen.tick(timedelta(seconds=590))
    await auth.authenticate(bearer(_mint(google)), PEER)
    assert google.fetches == 1
    frozen.tick(timedelta(seconds=20))
    await auth.authenticate(bearer(_mint(google)), PEER)
    assert google.fetches == 2


async def test_expires_is_used_when_there_is_no_max_age(
    frozen: FrozenDateTimeFactory, google: FakeGoogleCerts, make_gce: MakeGce
) -> None:
    now = datetime.now(UTC).timestamp()
    google.cache_headers = {
        "Date": formatdate(now, usegmt=True),
        "Expires": formatdate(now + 300, usegmt=True),
    }
    auth = make_gce()
    await auth.authenticate(bearer(_mint(google)), PEER)
    frozen.tick(timedelta(seconds=290))
    await auth.authenticate(bearer(_mint(google)), PEER)
    assert google.fetches == 1
    frozen.tick(timedelta(seconds=20))
    await auth.authenticate(bearer(_mint(google)), PEER)
    assert google.fetches == 2


async def test_no_cache_still_keeps_keys_for_the_minimum(
    frozen: FrozenDateTimeFactory, google: FakeGoogleCerts, make_gce: MakeGce
) -> None:
    google.cache_headers = {"Cache-Control": "no-cache, no-store"}
    auth = make_gce()
    for _ in range(3):
        await auth.authenticate(bearer(_mint(google)), PEER)
        frozen.tick(timedelta(seconds=10))
    assert google.fetches == 1
    frozen.tick(MIN_KEYS_TTL)
    await auth.authenticate(bearer(_mint(google)), PEER)
    assert google.fetches == 2


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Cache-Control": "public, max-age=19800, must-revalidate, no-transform"}, 19800.0),
        ({"Cache-Control": "max-age=600", "Age": "100"}, 500.0),
        ({"Cache-Control": "max-age=600", "Expires": "Thu, 01 Jan 1970 00:00:00 GMT"}, 600.0),
        (
            {"Expires": "Thu, 01 Jan 2026 01:00:00 GMT", "Date": "Thu, 01 Jan 2026 00:00:00 GMT"},
            3600.0,
        ),
        ({"Expires": "0"}, 0.0),
        ({"Cache-Control": "private, no-cache"}, 0.0),
        ({"Cache-Control": "max-age=soon"}, None),
        ({}, None),
    ],
)
def test_freshness_follows_rfc_9111(headers: dict[str, str], expected: float | None) -> None:
    assert freshness_lifetime(headers, datetime(2026, 1, 1, tzinfo=UTC)) == expected


def test_keys_are_kept_between_one_minute_and_one_day() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert keys_ttl({"Cache-Control": "max-age=1"}, now) == 60
    assert keys_ttl({"Cache-Control": "max-age=9999999"}, now) == 86400
    assert keys_ttl({}, now) == 300


async def test_a_new_kid_fetches_the_keys_again_at_most_once_per_interval(
    frozen: FrozenDateTimeFactory, google: FakeGoogleCerts, make_gce: MakeGce
) -> None:
    auth = make_gce(keys_refresh_interval="30s")
    await auth.authenticate(bearer(_mint(google)), PEER)
    stranger = GoogleKey.generate()  # in no key set
    error = await refusal(auth, _mint(google, stranger))
    assert error.reason == "unknown_key" and "next refresh in 30s" in error.message
    assert google.fetches == 1  # the keys were fetched a moment ago: not again

    rotated = google.rotate()  # Google starts signing with a new key
    frozen.tick(timedelta(seconds=31))
    attestation = await auth.authenticate(bearer(_mint(google, rotated)), PEER)
    assert str(attestation.spiffe_id) == WEB_ID
    assert google.fetches == 2

    error = await refusal(auth, _mint(google, stranger))
    assert error.reason == "unknown_key"
    assert google.fetches == 2


async def test_google_unreachable_then_back(
    frozen: FrozenDateTimeFactory, google: FakeGoogleCerts, make_gce: MakeGce
) -> None:
    auth = make_gce(keys_refresh_interval="30s")
    google.fail = 503
    error = await refusal(auth, _mint(google))
    assert error.reason == "google_keys_unavailable"
    assert "answered HTTP 503" in error.message
    assert status_for(error).name == "UNAVAILABLE"  # the CA's dependency, not the caller
    assert (await refusal(auth, _mint(google))).reason == "google_keys_unavailable"
    assert google.fetches == 1  # no retry storm
    google.fail = None
    frozen.tick(timedelta(seconds=31))
    await auth.authenticate(bearer(_mint(google)), PEER)


async def test_stale_keys_serve_while_google_is_down(
    frozen: FrozenDateTimeFactory, google: FakeGoogleCerts, make_gce: MakeGce
) -> None:
    google.max_age = 120
    auth = make_gce()
    await auth.authenticate(bearer(_mint(google)), PEER)
    google.fail = 500
    frozen.tick(timedelta(seconds=200))
    await auth.authenticate(bearer(_mint(google)), PEER)
    assert google.fetches == 2


# -- routing: Google tokens to GCE, the rest to Kubernetes ---------------------------------


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubeApi]:
    async with FakeKubeApi() as api:
        yield api


@pytest.fixture
async def k8s(kube: FakeKubeApi) -> AsyncIterator[KubernetesAuthenticator]:
    auth = KubernetesAuthenticator(TRUST_DOMAIN, [JwtCluster(issuer=kube.issuer)])
    yield auth
    await auth.close()


def _caller(k8s: KubernetesAuthenticator, gce: GceAuthenticator | None) -> CallerAuthenticator:
    async def never(_: object) -> bool:
        return False

    return CallerAuthenticator(k8s, SvidAuthenticator(TRUST_DOMAIN, tuple, never), gce=gce)


async def test_each_token_goes_to_its_own_authenticator(
    kube: FakeKubeApi,
    k8s: KubernetesAuthenticator,
    metadata: FakeMetadataServer,
    make_gce: MakeGce,
) -> None:
    caller = _caller(k8s, make_gce())
    vm = await caller.authenticate(bearer(await fetch(metadata)), PEER)
    assert vm.method is AuthMethod.GCE_IDENTITY and str(vm.spiffe_id) == WEB_ID
    pod = await caller.authenticate(bearer(kube.mint_token("default", "web")), PEER)
    assert pod.method is AuthMethod.K8S_JWT
    assert str(pod.spiffe_id) == "spiffe://cluster.local/ns/default/sa/web"


async def test_no_token_crosses_from_one_path_to_the_other(
    kube: FakeKubeApi,
    k8s: KubernetesAuthenticator,
    google: FakeGoogleCerts,
    metadata: FakeMetadataServer,
    make_gce: MakeGce,
) -> None:
    gce = make_gce()
    caller = _caller(k8s, gce)
    k8s_token = kube.mint_token("default", "web")
    assert not is_google_token(k8s_token)
    assert (await refusal(gce, k8s_token)).reason == "unknown_key"
    gce_token = await fetch(metadata)
    assert is_google_token(gce_token)
    assert (await refusal(k8s, gce_token)).reason in ("wrong_issuer", "unknown_key")

    # A cluster key signing a token that claims Google as issuer is routed to GCE, where
    # the cluster's key is not one of Google's.
    key = kube.keys[0].private_key
    assert isinstance(key, rsa.RSAPrivateKey)
    forged = GoogleKey(kube.keys[0].kid, key).sign(identity_claims(GceVm(), AUDIENCE))
    error = await refusal(caller, forged)
    assert error.reason == "unknown_key"
    assert google.fetches == 1


async def test_google_tokens_are_refused_when_gce_is_off(
    k8s: KubernetesAuthenticator, metadata: FakeMetadataServer
) -> None:
    error = await refusal(_caller(k8s, None), await fetch(metadata))
    assert error.reason == "gce_not_configured"
    assert "--gce-project" in error.message


async def test_closing_the_caller_closes_both_authenticators(
    k8s: KubernetesAuthenticator, metadata: FakeMetadataServer, make_gce: MakeGce
) -> None:
    gce = make_gce()
    await gce.authenticate(bearer(await fetch(metadata)), PEER)
    await _caller(k8s, gce).close()
    assert gce.keys._session is None
    await asyncio.sleep(0)
