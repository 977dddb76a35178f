"""A fake Kubernetes API server on loopback that speaks the real wire format.

It serves what meshca (and the node agent) talk to:

* ``GET /.well-known/openid-configuration`` and ``GET /openid/v1/jwks``: the service
  account issuer's OIDC discovery document and JWK Set, as a real API server does
  with ``--service-account-issuer`` (keys: RS256 by default, ES256 on request);
* ``POST /apis/authentication.k8s.io/v1/tokenreviews``: TokenReview v1. The caller must
  present ``expected_bearer``; the token is checked like the API server's
  service-account authenticator does (signature, ``iss``, time claims, audiences
  against ``spec.audiences`` or the API server's own audiences), and the answer has
  the real shape: ``status.user`` (``system:serviceaccount:<ns>:<sa>``, groups,
  ``extra`` with pod name/UID and credential id) and ``status.audiences``.

:meth:`FakeKubeApi.mint_token` produces projected service-account tokens with the real
claim set. Counters and failure switches let tests check what a client did and how
it copes with a broken server::

    async with FakeKubeApi() as kube:
        token = kube.mint_token("default", "httpbin", audiences=["istio-ca"])
        ...
        assert kube.tokenreview_calls == 1
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.fakes.loopback import LoopbackApp, serving_tls

DEFAULT_AUDIENCE = "istio-ca"
TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/openid/v1/jwks"
SERVICE_ACCOUNTS_GROUP = "system:serviceaccounts"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class SigningKey:
    """A service-account issuer key. ``kid`` is derived like the API server does it:
    the unpadded base64url SHA-256 of the DER SubjectPublicKeyInfo."""

    kid: str
    algorithm: str
    private_key: PrivateKey

    @classmethod
    def generate(cls, algorithm: str = "RS256") -> SigningKey:
        """A fresh key: RSA-2048 for ``RS256``, P-256 for ``ES256``."""
        key: PrivateKey
        if algorithm == "RS256":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif algorithm == "ES256":
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(f"unsupported algorithm {algorithm!r}; use RS256 or ES256")
        return cls.from_private_key(key)

    @classmethod
    def from_private_key(cls, key: PrivateKey) -> SigningKey:
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        kid = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
        return cls(kid, "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256", key)

    def public_jwk(self) -> dict[str, Any]:
        """The JWK a real API server publishes: ``use``, ``kty``, ``kid``, ``alg`` + key."""
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        return {"use": "sig", **jwk, "kid": self.kid, "alg": self.algorithm}


def projected_token_claims(
    issuer: str,
    namespace: str,
    service_account: str,
    *,
    audiences: Sequence[str],
    issued_at: datetime,
    ttl: timedelta,
    pod_name: str | None,
    pod_uid: str | None,
) -> dict[str, Any]:
    """The claim set of a projected service-account token (Kubernetes 1.29+)."""
    iat = int(issued_at.timestamp())
    private: dict[str, Any] = {
        "namespace": namespace,
        "serviceaccount": {
            "name": service_account,
            "uid": service_account_uid(namespace, service_account),
        },
    }
    if pod_name is not None:
        private["pod"] = {"name": pod_name, "uid": pod_uid or str(uuid.uuid4())}
    return {
        "aud": list(audiences),
        "exp": iat + int(ttl.total_seconds()),
        "iat": iat,
        "iss": issuer,
        "jti": str(uuid.uuid4()),
        "kubernetes.io": private,
        "nbf": iat,
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
    }


def service_account_uid(namespace: str, service_account: str) -> str:
    """A stable UID per service account, as the API server would have stored."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"serviceaccount/{namespace}/{service_account}"))


def _status(code: int, reason: str, message: str) -> web.Response:
    """A ``metav1.Status`` error body, as the API server sends with non-2xx answers."""
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


class FakeKubeApi(LoopbackApp):
    """A fake API server: OIDC discovery, JWKS and TokenReview v1 on 127.0.0.1.

    Args:
        issuer: the service-account issuer (``iss``); default: this server's own URL,
            so OIDC discovery works (known after :meth:`start`).
        algorithm: ``RS256`` (default) or ``ES256`` for the first signing key.
        keys: start with these signing keys instead (the first one signs).
        expected_bearer: the token TokenReview callers must send as
            ``Authorization: Bearer``; None lets anyone call.
        api_audiences: audiences used when ``spec.audiences`` is empty (the API
            server's ``--api-audiences``); default: the issuer.
        tls_dir: serve HTTPS with a fresh CA; its PEM is written to
            ``tls_dir/ca.pem`` (:attr:`ca_file`). None: plain HTTP.

    Failure switches (plain attributes, change them at any time):
        ``fail_tokenreview`` (HTTP status for every TokenReview, e.g. 500),
        ``force_unauthenticated`` (an error text: every review says
        ``authenticated: false``), ``status_hook`` (called with each TokenReview
        ``status`` dict before it is sent, to tamper with it), ``fail_jwks`` (HTTP
        status for discovery and JWKS), ``delay`` (seconds before every answer).
    """

    def __init__(
        self,
        *,
        issuer: str | None = None,
        algorithm: str = "RS256",
        keys: Sequence[SigningKey] | None = None,
        expected_bearer: str | None = "meshca-reviewer-token",
        api_audiences: Sequence[str] | None = None,
        tls_dir: Path | None = None,
    ) -> None:
        super().__init__()
        self._issuer = issuer
        self.keys: list[SigningKey] = list(keys) if keys else [SigningKey.generate(algorithm)]
        self.active_kid = self.keys[0].kid
        self.expected_bearer = expected_bearer
        self._api_audiences = list(api_audiences) if api_audiences is not None else None
        self._tls_dir = tls_dir
        self.ca_file: Path | None = tls_dir / "ca.pem" if tls_dir is not None else None

        self.tokenreview_calls = 0
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.last_review_request: dict[str, Any] | None = None
        self.last_authorization: str | None = None

        self.fail_tokenreview: int | None = None
        self.force_unauthenticated: str | None = None
        self.status_hook: Callable[[dict[str, Any]], None] | None = None
        self.fail_jwks: int | None = None
        self.delay: float = 0.0

    # -- lifecycle --------------------------------------------------------------------

    def build(self) -> web.Application:
        app = web.Application()
        app.router.add_get(DISCOVERY_PATH, self._discovery)
        app.router.add_get(JWKS_PATH, self._jwks)
        app.router.add_post(TOKENREVIEW_PATH, self._tokenreview)
        return app

    def ssl_context(self) -> ssl.SSLContext | None:
        if self._tls_dir is None or self.ca_file is None:
            return None
        return serving_tls(self._tls_dir, "kube-apiserver", self.ca_file)

    @property
    def issuer(self) -> str:
        return self._issuer if self._issuer is not None else self.url

    @property
    def jwks_url(self) -> str:
        return self.url + JWKS_PATH

    @property
    def api_audiences(self) -> list[str]:
        return self._api_audiences if self._api_audiences is not None else [self.issuer]

    # -- keys and tokens --------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set, as served at ``/openid/v1/jwks``."""
        return {"keys": [key.public_jwk() for key in self.keys]}

    def rotate_key(self, algorithm: str | None = None) -> SigningKey:
        """Add a new signing key, publish it and sign new tokens with it."""
        key = SigningKey.generate(algorithm or self.keys[-1].algorithm)
        self.keys.append(key)
        self.active_kid = key.kid
        return key

    def retire_key(self, kid: str) -> None:
        """Stop publishing (and accepting) the key ``kid``."""
        self.keys = [key for key in self.keys if key.kid != kid]
        if self.active_kid == kid and self.keys:
            self.active_kid = self.keys[-1].kid

    def key(self, kid: str | None = None) -> SigningKey:
        wanted = kid or self.active_kid
        for key in self.keys:
            if key.kid == wanted:
                return key
        raise KeyError(f"no signing key {wanted!r}")

    def mint_token(
        self,
        namespace: str = "default",
        service_account: str = "default",
        *,
        audiences: Sequence[str] = (DEFAULT_AUDIENCE,),
        ttl: timedelta = timedelta(hours=1),
        issued_at: datetime | None = None,
        pod_name: str | None = None,
        pod_uid: str | None = None,
        bound_to_pod: bool = True,
        issuer: str | None = None,
        kid: str | None = None,
        signing_key: SigningKey | None = None,
        claims: Mapping[str, Any] | None = None,
        drop_claims: Iterable[str] = (),
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """A projected service-account token with the real claim set.

        ``issued_at`` defaults to now (``datetime.now``, so freezegun applies).
        Without ``pod_name`` a bound token names a generated pod; ``bound_to_pod=False``
        leaves the pod claim out. ``signing_key`` signs with a key this server does
        not publish; ``kid`` signs with one of its keys, or (with ``signing_key``) sets
        the header ``kid``. ``claims`` adds or replaces top-level claims,
        ``drop_claims`` removes them, ``headers`` adds JOSE header fields.
        """
        key = signing_key or self.key(kid)
        if bound_to_pod and pod_name is None:
            pod_name = f"{service_account}-6d4cf56db6-x7k2p"
        payload = projected_token_claims(
            issuer or self.issuer,
            namespace,
            service_account,
            audiences=audiences,
            issued_at=issued_at or datetime.now(UTC),
            ttl=ttl,
            pod_name=pod_name if bound_to_pod else None,
            pod_uid=pod_uid,
        )
        payload.update(claims or {})
        for name in drop_claims:
            payload.pop(name, None)
        header = {"kid": kid if signing_key is not None and kid else key.kid, **(headers or {})}
        return jwt.encode(payload, key.private_key, algorithm=key.algorithm, headers=header)

    # -- handlers ---------------------------------------------------------------------

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        await self._pause()
        if self.fail_jwks is not None:
            return _status(self.fail_jwks, "InternalError", "forced failure")
        return web.json_response(
            {
                "issuer": self.issuer,
                "jwks_uri": self.jwks_url,
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": sorted(
                    {key.algorithm for key in self.keys}
                ),
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        await self._pause()
        if self.fail_jwks is not None:
            return _status(self.fail_jwks, "InternalError", "forced failure")
        return web.json_response(self.jwks(), content_type="application/jwk-set+json")

    async def _tokenreview(self, request: web.Request) -> web.Response:
        self.tokenreview_calls += 1
        self.last_authorization = request.headers.get("Authorization")
        await self._pause()
        if self.expected_bearer is not None and (
            self.last_authorization != f"Bearer {self.expected_bearer}"
        ):
            return _status(401, "Unauthorized", "Unauthorized")
        if self.fail_tokenreview is not None:
            return _status(self.fail_tokenreview, "InternalError", "forced failure")
        try:
            body = await request.json()
        except ValueError:
            return _status(400, "BadRequest", "the request body is not JSON")
        spec = body.get("spec") if isinstance(body, dict) else None
        if (
            not isinstance(spec, dict)
            or body.get("apiVersion") != "authentication.k8s.io/v1"
            or body.get("kind") != "TokenReview"
            or not isinstance(spec.get("token"), str)
        ):
            return _status(400, "BadRequest", "not an authentication.k8s.io/v1 TokenReview")
        self.last_review_request = body
        requested = [a for a in spec.get("audiences") or [] if isinstance(a, str)]
        status = self._review(spec["token"], requested or self.api_audiences)
        if self.status_hook is not None:
            self.status_hook(status)
        answer = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
        return web.json_response(answer, status=201)

    def _review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """The service-account authenticator's verdict, as a TokenReview status."""
        if self.force_unauthenticated is not None:
            return {"user": {}, "error": self.force_unauthenticated}
        try:
            claims = self._verify(token)
        except jwt.PyJWTError as exc:
            return {"user": {}, "error": f"[invalid bearer token, {exc}]"}
        token_audiences = claims.get("aud")
        if isinstance(token_audiences, str):
            token_audiences = [token_audiences]
        if not isinstance(token_audiences, list):
            token_audiences = []
        matched = [a for a in audiences if a in token_audiences]
        if not matched:
            return {
                "user": {},
                "error": f"[invalid bearer token, token audiences {token_audiences} is "
                f"invalid for the target audiences {audiences}]",
            }
        private = claims.get("kubernetes.io")
        if not isinstance(private, dict):
            private = {}
        account = private.get("serviceaccount")
        namespace = private.get("namespace")
        if not isinstance(account, dict):
            account = {}
        name = account.get("name")
        if not isinstance(namespace, str) or not isinstance(name, str):
            return {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
        extra: dict[str, list[str]] = {}
        pod = private.get("pod")
        if isinstance(pod, dict):
            extra["authentication.kubernetes.io/pod-name"] = [str(pod.get("name"))]
            extra["authentication.kubernetes.io/pod-uid"] = [str(pod.get("uid"))]
        if isinstance(claims.get("jti"), str):
            extra["authentication.kubernetes.io/credential-id"] = [f"JTI={claims['jti']}"]
        return {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{namespace}:{name}",
                "uid": account.get("uid") or service_account_uid(namespace, name),
                "groups": [
                    SERVICE_ACCOUNTS_GROUP,
                    f"{SERVICE_ACCOUNTS_GROUP}:{namespace}",
                    "system:authenticated",
                ],
                "extra": extra,
            },
            "audiences": matched,
        }

    def _verify(self, token: str) -> dict[str, Any]:
        header = jwt.get_unverified_header(token)
        kid = header.get("kid")
        candidates = [k for k in self.keys if k.kid == kid] if kid else list(self.keys)
        if not candidates:
            raise jwt.InvalidTokenError("square/go-jose: error in cryptographic primitive")
        issuers = {self.issuer}
        last: jwt.PyJWTError | None = None
        for key in candidates:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key.private_key.public_key(),
                    algorithms=[key.algorithm],
                    options={"verify_aud": False, "verify_iss": False},
                )
            except jwt.PyJWTError as exc:
                last = exc
                continue
            if claims.get("iss") not in issuers:
                raise jwt.InvalidIssuerError("token issuer is not accepted")
            return claims
        assert last is not None
        raise last

    async def _pause(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
