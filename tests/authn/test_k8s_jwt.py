"""``jwt`` mode: service-account tokens verified locally against the issuer's JWKS."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from freezegun import freeze_time

from meshca.authn._jwks import KEYS_MAX_AGE
from meshca.authn.base import AuthMethod
from meshca.errors import AuthenticationError
from tests.authn.conftest import PEER, MakeAuthenticator, bearer, jwt_cluster
from tests.fakes.kube import FakeKubeApi, SigningKey

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def _refused(auth_call: object, reason: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        await auth_call  # type: ignore[misc]
    assert info.value.reason == reason, info.value.message
    return info.value


async def test_good_token_by_oidc_discovery(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    auth = make_authenticator(jwt_cluster(kube))
    token = kube.mint_token("prod", "httpbin", pod_name="httpbin-1", pod_uid="uid-1")
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]

    attestation = await auth.authenticate(bearer(token), PEER)

    assert str(attestation.spiffe_id) == "spiffe://cluster.local/ns/prod/sa/httpbin"
    assert attestation.method is AuthMethod.K8S_JWT
    assert attestation.selectors == (
        "k8s:cluster:Kubernetes",
        "k8s:ns:prod",
        "k8s:sa:httpbin",
        "k8s:pod-name:httpbin-1",
        "k8s:pod-uid:uid-1",
    )
    assert attestation.expires_at == datetime.fromtimestamp(exp, UTC)
    assert attestation.expires_at.tzinfo is not None
    assert (kube.discovery_fetches, kube.jwks_fetches) == (1, 1)


async def test_es256_issuer(make_authenticator: MakeAuthenticator) -> None:
    async with FakeKubeApi(algorithm="ES256") as kube:
        auth = make_authenticator(jwt_cluster(kube))
        attestation = await auth.authenticate(bearer(kube.mint_token("a", "b")), PEER)
    assert str(attestation.spiffe_id) == "spiffe://cluster.local/ns/a/sa/b"


async def test_token_not_bound_to_a_pod_has_no_pod_selectors(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    auth = make_authenticator(jwt_cluster(kube))
    token = kube.mint_token("prod", "batch", bound_to_pod=False)
    attestation = await auth.authenticate(bearer(token), PEER)
    assert attestation.selectors == ("k8s:cluster:Kubernetes", "k8s:ns:prod", "k8s:sa:batch")


async def test_jwks_url_skips_discovery(make_authenticator: MakeAuthenticator) -> None:
    issuer = "https://kubernetes.default.svc.cluster.local"
    async with FakeKubeApi(issuer=issuer) as kube:
        auth = make_authenticator(jwt_cluster(kube, jwks_url=kube.jwks_url))
        attestation = await auth.authenticate(bearer(kube.mint_token("a", "b")), PEER)
        assert str(attestation.spiffe_id).endswith("/ns/a/sa/b")
        assert (kube.discovery_fetches, kube.jwks_fetches) == (0, 1)


async def test_jwks_file_needs_no_network(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, tmp_path: Path
) -> None:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(kube.jwks()))
    auth = make_authenticator(jwt_cluster(kube, jwks_file=jwks_file))
    attestation = await auth.authenticate(bearer(kube.mint_token("a", "b")), PEER)
    assert str(attestation.spiffe_id).endswith("/ns/a/sa/b")
    assert (kube.discovery_fetches, kube.jwks_fetches) == (0, 0)


async def test_unreadable_jwks_file(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, tmp_path: Path
) -> None:
    auth = make_authenticator(jwt_cluster(kube, jwks_file=tmp_path / "missing.json"))
    error = await _refused(auth.authenticate(bearer(kube.mint_token()), PEER), "jwks_unavailable")
    assert "missing.json" in error.message


async def test_hs256_signed_with_the_public_key_is_refused_before_any_key_lookup(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    """The algorithm-confusion attack (RFC 8725 section 2.1)."""
    auth = make_authenticator(jwt_cluster(kube))
    good = kube.mint_token("kube-system", "admin")
    header = {"alg": "HS256", "kid": kube.active_kid, "typ": "JWT"}
    signing_input = f"{_b64(json.dumps(header).encode())}.{good.split('.')[1]}"
    public_pem = (
        kube.key()
        .private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()

    error = await _refused(
        auth.authenticate(bearer(f"{signing_input}.{_b64(mac)}"), PEER), "bad_algorithm"
    )
    assert "HS256" in error.message and "RS256, ES256" in error.message
    assert kube.jwks_fetches == 0


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "HS256", "RS512", "PS256", "EdDSA"])
async def test_algorithms_other_than_rs256_es256_are_refused(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, alg: str
) -> None:
    auth = make_authenticator(jwt_cluster(kube))
    _, payload, signature = kube.mint_token().split(".")
    header = _b64(json.dumps({"alg": alg, "kid": kube.active_kid}).encode())
    await _refused(
        auth.authenticate(bearer(f"{header}.{payload}.{signature}"), PEER), "bad_algorithm"
    )


async def test_header_algorithm_must_match_the_key(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    """An ES256 header naming an RSA key's kid is refused, not tried."""
    auth = make_authenticator(jwt_cluster(kube))
    ec_key = SigningKey.generate("ES256")
    token = kube.mint_token(signing_key=ec_key, kid=kube.active_kid)
    error = await _refused(auth.authenticate(bearer(token), PEER), "bad_algorithm")
    assert "ES256" in error.message and "RS256" in error.message


async def test_unknown_kid_refreshes_once_then_is_rate_limited(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    auth = make_authenticator(jwt_cluster(kube, jwks_refresh_interval="30s"))
    stranger = SigningKey.generate()
    with freeze_time(T0, real_asyncio=True) as clock:
        await auth.authenticate(bearer(kube.mint_token()), PEER)
        assert kube.jwks_fetches == 1

        # Right after a fetch: refused without fetching again.
        error = await _refused(
            auth.authenticate(bearer(kube.mint_token(signing_key=stranger)), PEER), "unknown_key"
        )
        assert "next refresh in 30s" in error.message
        assert kube.jwks_fetches == 1

        clock.tick(timedelta(seconds=31))
        await _refused(
            auth.authenticate(bearer(kube.mint_token(signing_key=stranger)), PEER), "unknown_key"
        )
        assert kube.jwks_fetches == 2  # exactly one refresh

        for _ in range(5):
            await _refused(
                auth.authenticate(bearer(kube.mint_token(signing_key=stranger)), PEER),
                "unknown_key",
            )
        clock.tick(timedelta(seconds=29))
        await _refused(
            auth.authenticate(bearer(kube.mint_token(signing_key=stranger)), PEER), "unknown_key"
        )
        assert kube.jwks_fetches == 2  # rate-limited

        # Known keys keep working while unknown ones are rate-limited.
        await auth.authenticate(bearer(kube.mint_token()), PEER)
        assert kube.jwks_fetches == 2


async def test_key_rotation_is_picked_up_after_the_interval(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    auth = make_authenticator(jwt_cluster(kube, jwks_refresh_interval="30s"))
    with freeze_time(T0, real_asyncio=True) as clock:
        old_token = kube.mint_token("a", "old")
        await auth.authenticate(bearer(old_token), PEER)
        old_kid = kube.active_kid

        kube.rotate_key()
        clock.tick(timedelta(seconds=31))
        attestation = await auth.authenticate(bearer(kube.mint_token("a", "new")), PEER)
        assert str(attestation.spiffe_id).endswith("/sa/new")
        assert kube.jwks_fetches == 2
        await auth.authenticate(bearer(old_token), PEER)  # old key still published

        # Once the old key is retired, keys older than KEYS_MAX_AGE are re-fetched and
        # tokens signed by it stop verifying.
        kube.retire_key(old_kid)
        clock.tick(KEYS_MAX_AGE + timedelta(seconds=1))
        await _refused(auth.authenticate(bearer(old_token), PEER), "unknown_key")
        assert kube.jwks_fetches == 3


async def test_concurrent_requests_for_a_new_key_share_one_fetch(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    """Requests that queue behind a refresh use its result instead of being rate-limited."""
    auth = make_authenticator(jwt_cluster(kube, jwks_refresh_interval="30s"))
    with freeze_time(T0, real_asyncio=True) as clock:
        await auth.authenticate(bearer(kube.mint_token()), PEER)
        kube.rotate_key()
        kube.delay = 0.05  # keep the refresh in flight while the others arrive
        clock.tick(timedelta(seconds=31))
        tokens = [kube.mint_token("a", f"sa{n}") for n in range(10)]
        results = await asyncio.gather(*(auth.authenticate(bearer(t), PEER) for t in tokens))
    assert [str(r.spiffe_id).rsplit("/", 1)[1] for r in results] == [f"sa{n}" for n in range(10)]
    assert kube.jwks_fetches == 2


async def test_keys_held_are_used_while_the_issuer_is_down(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    auth = make_authenticator(jwt_cluster(kube))
    with freeze_time(T0, real_asyncio=True) as clock:
        await auth.authenticate(bearer(kube.mint_token()), PEER)
        kube.fail_jwks = 503
        clock.tick(KEYS_MAX_AGE + timedelta(seconds=1))
        await auth.authenticate(bearer(kube.mint_token()), PEER)
        assert kube.jwks_fetches == 2  # tried, failed, kept the old keys


async def test_issuer_down_at_first_use_is_unavailable_then_recovers(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    auth = make_authenticator(jwt_cluster(kube, jwks_refresh_interval="30s"))
    kube.fail_jwks = 500
    with freeze_time(T0, real_asyncio=True) as clock:
        error = await _refused(
            auth.authenticate(bearer(kube.mint_token()), PEER), "jwks_unavailable"
        )
        assert "HTTP 500" in error.message
        await _refused(auth.authenticate(bearer(kube.mint_token()), PEER), "jwks_unavailable")
        assert kube.discovery_fetches == 1  # no hammering the issuer

        kube.fail_jwks = None
        clock.tick(timedelta(seconds=31))
        await auth.authenticate(bearer(kube.mint_token()), PEER)


async def test_discovery_naming_another_issuer_is_refused(
    make_authenticator: MakeAuthenticator,
) -> None:
    async with FakeKubeApi(issuer="https://evil.example.com") as kube:
        auth = make_authenticator(jwt_cluster(kube, issuer=kube.url))
        token = kube.mint_token(issuer=kube.url)
        error = await _refused(auth.authenticate(bearer(token), PEER), "jwks_unavailable")
        assert "evil.example.com" in error.message


async def test_issuer_timeout(kube: FakeKubeApi, make_authenticator: MakeAuthenticator) -> None:
    kube.delay = 2.0
    auth = make_authenticator(jwt_cluster(kube, timeout="200ms"))
    error = await _refused(auth.authenticate(bearer(kube.mint_token()), PEER), "jwks_unavailable")
    assert "Timeout" in error.message


@pytest.mark.parametrize(
    ("skew", "outcome"),
    [
        (timedelta(seconds=-20), "ok"),  # expired 20s ago, inside the 30s leeway
        (timedelta(seconds=-31), "token_expired"),
        (timedelta(hours=-2), "token_expired"),
    ],
)
async def test_expiry_with_leeway(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, skew: timedelta, outcome: str
) -> None:
    auth = make_authenticator(jwt_cluster(kube, leeway="30s"))
    token = kube.mint_token(issued_at=T0, ttl=timedelta(minutes=10))
    with freeze_time(T0 + timedelta(minutes=10) - skew, real_asyncio=True):
        if outcome == "ok":
            await auth.authenticate(bearer(token), PEER)
        else:
            await _refused(auth.authenticate(bearer(token), PEER), outcome)


@pytest.mark.parametrize(
    ("ahead", "outcome"),
    [(timedelta(seconds=20), "ok"), (timedelta(seconds=45), "token_not_yet_valid")],
)
async def test_iat_and_nbf_in_the_future(
    kube: FakeKubeApi,
    make_authenticator: MakeAuthenticator,
    ahead: timedelta,
    outcome: str,
) -> None:
    auth = make_authenticator(jwt_cluster(kube, leeway="30s"))
    with freeze_time(T0, real_asyncio=True):
        for drop in ([], ["nbf"]):  # nbf and iat, then iat alone
            token = kube.mint_token(issued_at=T0 + ahead, drop_claims=drop)
            if outcome == "ok":
                await auth.authenticate(bearer(token), PEER)
            else:
                await _refused(auth.authenticate(bearer(token), PEER), outcome)


async def test_audience_must_intersect(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    auth = make_authenticator(jwt_cluster(kube, audiences=["istio-ca", "meshca"]))
    await auth.authenticate(bearer(kube.mint_token(audiences=["meshca", "vault"])), PEER)
    error = await _refused(
        auth.authenticate(bearer(kube.mint_token(audiences=[kube.issuer])), PEER), "wrong_audience"
    )
    assert "istio-ca" in error.message


async def test_wrong_issuer(kube: FakeKubeApi, make_authenticator: MakeAuthenticator) -> None:
    auth = make_authenticator(jwt_cluster(kube))
    token = kube.mint_token(issuer="https://container.googleapis.com/v1/projects/p/clusters/c")
    await _refused(auth.authenticate(bearer(token), PEER), "wrong_issuer")


@pytest.mark.parametrize("claim", ["exp", "aud", "iss", "kubernetes.io"])
async def test_required_claims(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, claim: str
) -> None:
    auth = make_authenticator(jwt_cluster(kube))
    token = kube.mint_token(drop_claims=[claim])
    error = await _refused(auth.authenticate(bearer(token), PEER), "missing_claims")
    assert claim in error.message


async def test_service_account_name_is_required(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    auth = make_authenticator(jwt_cluster(kube))
    token = kube.mint_token(claims={"kubernetes.io": {"namespace": "a", "serviceaccount": {}}})
    await _refused(auth.authenticate(bearer(token), PEER), "missing_claims")


async def test_sub_must_agree_with_kubernetes_claims(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator
) -> None:
    auth = make_authenticator(jwt_cluster(kube))
    forged = kube.mint_token(
        "default", "web", claims={"sub": "system:serviceaccount:kube-system:x"}
    )
    await _refused(auth.authenticate(bearer(forged), PEER), "inconsistent_claims")
    without_sub = kube.mint_token("default", "web", drop_claims=["sub"])
    attestation = await auth.authenticate(bearer(without_sub), PEER)
    assert str(attestation.spiffe_id).endswith("/ns/default/sa/web")


async def test_tampered_signature(kube: FakeKubeApi, make_authenticator: MakeAuthenticator) -> None:
    auth = make_authenticator(jwt_cluster(kube))
    head, payload, signature = kube.mint_token().split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    await _refused(auth.authenticate(bearer(f"{head}.{payload}.{flipped}"), PEER), "bad_signature")


async def test_https_issuer_verified_with_ca_file(
    make_authenticator: MakeAuthenticator, tmp_path: Path
) -> None:
    async with FakeKubeApi(tls_dir=tmp_path / "tls") as kube:
        assert kube.url.startswith("https://") and kube.ca_file is not None
        trusted = make_authenticator(jwt_cluster(kube, ca_file=kube.ca_file))
        attestation = await trusted.authenticate(bearer(kube.mint_token("a", "b")), PEER)
        assert str(attestation.spiffe_id).endswith("/ns/a/sa/b")

        untrusted = make_authenticator(jwt_cluster(kube))  # system roots only
        error = await _refused(
            untrusted.authenticate(bearer(kube.mint_token("a", "b")), PEER), "jwks_unavailable"
        )
        assert "certificate" in error.message.lower()


async def test_verified_tokens_are_cached_by_hash_until_expiry(
    kube: FakeKubeApi, make_authenticator: MakeAuthenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart storm presenting one token costs one signature check, not one per call."""
    decodes = 0
    real_decode = jwt.decode

    def counting_decode(*args: object, **kwargs: object) -> object:
        nonlocal decodes
        decodes += 1
        return real_decode(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jwt, "decode", counting_decode)
    with freeze_time(T0) as clock:
        auth = make_authenticator(jwt_cluster(kube, cache_ttl=timedelta(seconds=60)))
        token = kube.mint_token("prod", "web", ttl=timedelta(minutes=10))
        for _ in range(50):
            await auth.authenticate(bearer(token), PEER)
        assert decodes == 1
        clock.tick(timedelta(seconds=61))  # past the cache TTL: verified again
        await auth.authenticate(bearer(token), PEER)
        assert decodes == 2
        clock.tick(timedelta(minutes=10))  # past exp: refused, not served from the cache
        await _refused(auth.authenticate(bearer(token), PEER), "token_expired")
    verifier = next(iter(auth._validators.values()))  # type: ignore[attr-defined]
    assert all(token not in key for key in verifier.cache.keys())
