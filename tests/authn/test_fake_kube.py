"""The fake API server speaks the Kubernetes wire format (checked with a plain client)."""

from __future__ import annotations

from typing import Any

import aiohttp
import jwt

from tests.authn.conftest import REVIEWER_TOKEN
from tests.fakes.kube import TOKENREVIEW_PATH, FakeKubeApi, service_account_uid


async def _post_review(
    kube: FakeKubeApi, body: Any, authorization: str | None = f"Bearer {REVIEWER_TOKEN}"
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": authorization} if authorization else {}
    async with aiohttp.ClientSession() as session:
        async with session.post(kube.url + TOKENREVIEW_PATH, json=body, headers=headers) as r:
            return r.status, await r.json()


def _review(token: str, audiences: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"token": token}
    if audiences is not None:
        spec["audiences"] = audiences
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}


async def test_discovery_and_jwks(kube: FakeKubeApi) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(kube.url + "/.well-known/openid-configuration") as r:
            discovery = await r.json()
        async with session.get(discovery["jwks_uri"]) as r:
            assert r.content_type == "application/jwk-set+json"
            jwks = await r.json(content_type=None)
    assert discovery["issuer"] == kube.issuer
    assert discovery["id_token_signing_alg_values_supported"] == ["RS256"]
    (key,) = jwks["keys"]
    assert key["kid"] == kube.active_kid and key["use"] == "sig" and key["kty"] == "RSA"
    assert "d" not in key  # public half only
    assert (kube.discovery_fetches, kube.jwks_fetches) == (1, 1)


async def test_minted_token_has_the_projected_claim_set(kube: FakeKubeApi) -> None:
    token = kube.mint_token("prod", "web", pod_name="web-0", pod_uid="u-0", audiences=["a", "b"])
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header["alg"] == "RS256" and header["kid"] == kube.active_kid
    assert claims["iss"] == kube.issuer and claims["aud"] == ["a", "b"]
    assert claims["sub"] == "system:serviceaccount:prod:web"
    assert claims["exp"] - claims["iat"] == 3600 and claims["nbf"] == claims["iat"]
    assert claims["kubernetes.io"] == {
        "namespace": "prod",
        "pod": {"name": "web-0", "uid": "u-0"},
        "serviceaccount": {"name": "web", "uid": service_account_uid("prod", "web")},
    }


async def test_tokenreview_authenticated_answer(kube: FakeKubeApi) -> None:
    token = kube.mint_token("prod", "web", pod_name="web-0", pod_uid="u-0")
    code, answer = await _post_review(kube, _review(token, ["istio-ca", "other"]))
    assert code == 201
    assert answer["kind"] == "TokenReview" and answer["apiVersion"] == "authentication.k8s.io/v1"
    status = answer["status"]
    assert status["authenticated"] is True
    assert status["audiences"] == ["istio-ca"]
    assert status["user"]["username"] == "system:serviceaccount:prod:web"
    assert status["user"]["groups"] == [
        "system:serviceaccounts",
        "system:serviceaccounts:prod",
        "system:authenticated",
    ]
    extra = status["user"]["extra"]
    assert extra["authentication.kubernetes.io/pod-name"] == ["web-0"]
    assert extra["authentication.kubernetes.io/pod-uid"] == ["u-0"]
    assert extra["authentication.kubernetes.io/credential-id"][0].startswith("JTI=")


async def test_tokenreview_without_audiences_uses_the_api_audience(kube: FakeKubeApi) -> None:
    ca_token = kube.mint_token()  # aud istio-ca
    api_token = kube.mint_token(audiences=[kube.issuer])
    _, answer = await _post_review(kube, _review(ca_token))
    assert "authenticated" not in answer["status"] and "invalid" in answer["status"]["error"]
    _, answer = await _post_review(kube, _review(api_token, []))
    assert answer["status"]["audiences"] == [kube.issuer]


async def test_tokenreview_refusals(kube: FakeKubeApi) -> None:
    token = kube.mint_token()
    code, answer = await _post_review(kube, _review(token), authorization=None)
    assert code == 401 and answer["kind"] == "Status" and answer["reason"] == "Unauthorized"
    code, answer = await _post_review(kube, {"kind": "Pod"})
    assert code == 400 and answer["reason"] == "BadRequest"
    kube.fail_tokenreview = 503
    code, _ = await _post_review(kube, _review(token))
    assert code == 503
    kube.fail_tokenreview = None
    kube.force_unauthenticated = "nope"
    _, answer = await _post_review(kube, _review(token))
    assert answer["status"] == {"user": {}, "error": "nope"}
    assert kube.tokenreview_calls == 4


async def test_rotation_and_retirement(kube: FakeKubeApi) -> None:
    old = kube.mint_token()
    old_kid = kube.active_kid
    new_key = kube.rotate_key("ES256")
    assert kube.active_kid == new_key.kid != old_kid
    assert jwt.get_unverified_header(kube.mint_token())["alg"] == "ES256"
    assert {k["kid"] for k in kube.jwks()["keys"]} == {old_kid, new_key.kid}
    kube.retire_key(old_kid)
    _, answer = await _post_review(kube, _review(old, ["istio-ca"]))
    assert "authenticated" not in answer["status"]
