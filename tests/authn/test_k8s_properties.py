"""Properties: whatever a caller sends as a token, the only failure is AuthenticationError."""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshca.authn.k8s import KubernetesAuthenticator
from meshca.config import JwtCluster
from meshca.errors import AuthenticationError
from tests.authn.conftest import PEER, MakeAuthenticator, bearer, tokenreview_cluster
from tests.fakes.kube import FakeKubeApi

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "tokens"
ISSUER = (VECTORS / "issuer.txt").read_text().strip()
KID = json.loads((VECTORS / "jwks.json").read_text())["keys"][0]["kid"]


def _corpus_key() -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key((VECTORS / "signing-key.pem").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


_KEY = _corpus_key()
NOW = int(time.time())

REASONS = {
    "unknown_cluster",
    "missing_token",
    "token_too_large",
    "malformed_token",
    "invalid_identity",
    "bad_algorithm",
    "unknown_key",
    "bad_signature",
    "token_expired",
    "token_not_yet_valid",
    "wrong_audience",
    "wrong_issuer",
    "missing_claims",
    "inconsistent_claims",
    "jwks_unavailable",
    "tokenreview_unavailable",
    "token_rejected",
    "not_a_service_account",
}

PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
names = st.sampled_from(["default", "httpbin", "prod", "a/b", "..", "", "kube-system"])
_ABSENT = object()


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` 7 times in 8, else any JSON value or the claim left out."""
    weird = json_values | st.just(_ABSENT)
    return st.sampled_from([True] * 7 + [False]).flatmap(lambda ok: good if ok else weird)


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not _ABSENT}


def _object(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(fields).map(_present)


jwt_shaped = st.builds(
    lambda header, payload, signature: (
        f"{_b64(_json(header))}.{_b64(_json(payload))}.{_b64(signature)}"
    ),
    _object(
        alg=mostly(st.sampled_from(["RS256", "ES256", "none", "HS256"])),
        kid=mostly(st.just(KID)),
        crit=st.just(_ABSENT) | json_values,
    ),
    st.dictionaries(st.text(max_size=12), json_values, max_size=6) | json_values,
    st.binary(max_size=300),
)

arbitrary_tokens = (
    st.text(max_size=400)
    | st.binary(max_size=400).map(lambda raw: raw.decode("latin-1"))
    | st.from_regex(r"[A-Za-z0-9_\-]{0,60}(\.[A-Za-z0-9_=\-]{0,60}){0,4}", fullmatch=True)
    | jwt_shaped
)


@st.composite
def signed_claims(draw: st.DrawFn) -> dict[str, Any]:
    """A consistent projected-token claim set, then up to four random mutations."""
    namespace, name = draw(names), draw(names)
    pod = {"name": draw(names), "uid": str(draw(st.uuids()))}
    account = {"name": name, "uid": str(draw(st.uuids()))}
    k8s = {"namespace": namespace, "serviceaccount": account, "pod": pod}
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": draw(st.sampled_from([["istio-ca"], "istio-ca", ["vault", "istio-ca"], ["vault"]])),
        "exp": NOW + draw(st.sampled_from([3600, 86400, 60, 10, -10, -600])),
        "iat": NOW + draw(st.sampled_from([-60, -3600, 0, 10, 600])),
        "nbf": NOW + draw(st.sampled_from([-60, -3600, 0, 10, 600])),
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "kubernetes.io": k8s,
    }
    containers: list[dict[str, Any]] = [claims, k8s, account, pod]
    for _ in range(draw(st.integers(0, 4))):
        target = draw(st.sampled_from(containers))
        key = draw(st.sampled_from(sorted({*target, "sub", "extra"})))
        value = draw(json_values | st.just(_ABSENT))
        if value is _ABSENT:
            target.pop(key, None)
        else:
            target[key] = value
    return claims


def _signed(claims: dict[str, Any]) -> str:
    """Claims signed with the corpus key: valid signatures over arbitrary claim sets."""
    signing_input = f"{_b64(_json({'alg': 'RS256', 'kid': KID}))}.{_b64(_json(claims))}"
    signature = _KEY.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


def _corpus_auth(make_authenticator: MakeAuthenticator) -> KubernetesAuthenticator:
    return make_authenticator(
        JwtCluster(issuer=ISSUER, jwks_file=VECTORS / "jwks.json", leeway=timedelta(seconds=30))
    )


async def _only_authentication_errors(auth: KubernetesAuthenticator, token: str) -> None:
    try:
        attestation = await auth.authenticate(bearer(token), PEER)
    except AuthenticationError as exc:
        assert exc.reason in REASONS, exc.reason
        assert len(token) < 16 or token not in exc.message
    else:
        raise AssertionError(f"accepted a made-up token as {attestation.spiffe_id}")


@PROPERTY_SETTINGS
@given(token=arbitrary_tokens)
async def test_jwt_mode_arbitrary_tokens(make_authenticator: MakeAuthenticator, token: str) -> None:
    await _only_authentication_errors(_corpus_auth(make_authenticator), token)


@PROPERTY_SETTINGS
@given(token=arbitrary_tokens)
async def test_tokenreview_mode_arbitrary_tokens(
    kube: FakeKubeApi,
    make_authenticator: MakeAuthenticator,
    credentials_file: Path,
    token: str,
) -> None:
    auth = make_authenticator(tokenreview_cluster(kube, credentials_file))
    await _only_authentication_errors(auth, token)


@PROPERTY_SETTINGS
@given(claims=signed_claims())
async def test_validly_signed_arbitrary_claims(
    make_authenticator: MakeAuthenticator, claims: dict[str, Any]
) -> None:
    """With a good signature, any claim set is refused cleanly or fully consistent."""
    auth = _corpus_auth(make_authenticator)
    try:
        attestation = await auth.authenticate(bearer(_signed(claims)), PEER)
    except AuthenticationError as exc:
        assert exc.reason in REASONS, exc.reason
        return
    k8s = claims["kubernetes.io"]
    namespace, name = k8s["namespace"], k8s["serviceaccount"]["name"]
    assert str(attestation.spiffe_id) == f"spiffe://cluster.local/ns/{namespace}/sa/{name}"
    assert claims["iss"] == ISSUER
    assert "istio-ca" in (claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]])
    assert attestation.expires_at is not None
    assert attestation.expires_at.timestamp() > time.time() - 30
    assert claims.get("sub", f"system:serviceaccount:{namespace}:{name}") == (
        f"system:serviceaccount:{namespace}:{name}"
    )
    pod = k8s.get("pod") if isinstance(k8s.get("pod"), dict) else {}
    if isinstance(pod.get("uid"), str):
        assert f"k8s:pod-uid:{pod['uid']}" in attestation.selectors
