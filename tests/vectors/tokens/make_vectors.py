"""Regenerate the bad-token corpus in this directory.

    .venv/bin/python tests/vectors/tokens/make_vectors.py

Keys are made once and kept (``*-key.pem``, test-only, never used anywhere else); all
tokens use the fixed time ``NOW`` below, so the tests check them with freezegun at that
instant. RS256 signatures are deterministic, so re-running reproduces the same files.
See README.md for what each token's defect is.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

HERE = Path(__file__).resolve().parent
NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "istio-ca"
API_AUDIENCE = ISSUER  # what a token for the API server itself carries


def _key(name: str) -> rsa.RSAPrivateKey:
    path = HERE / f"{name}-key.pem"
    if not path.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(loaded, rsa.RSAPrivateKey)
    return loaded


def _kid(key: rsa.RSAPrivateKey) -> str:
    """As the API server derives it: base64url(sha256(DER SubjectPublicKeyInfo))."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def _jwks(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {"keys": [{"use": "sig", **jwk, "kid": _kid(key), "alg": "RS256"}]}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(obj: dict[str, Any]) -> str:
    return _b64(json.dumps(obj, separators=(",", ":"), sort_keys=True).encode())


def claims(
    namespace: str = "default", service_account: str = "httpbin", **override: Any
) -> dict[str, Any]:
    """A projected service-account token's claims, issued at NOW for one hour."""
    base: dict[str, Any] = {
        "aud": [AUDIENCE],
        "exp": NOW + 3600,
        "iat": NOW,
        "iss": ISSUER,
        "jti": "4b6c1f8e-5d0e-4a4c-9c43-6a4f0b1c2d3e",
        "kubernetes.io": {
            "namespace": namespace,
            "pod": {
                "name": "httpbin-6d4cf56db6-x7k2p",
                "uid": "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9",
            },
            "serviceaccount": {
                "name": service_account,
                "uid": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
            },
        },
        "nbf": NOW,
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
    }
    base.update(override)
    return {k: v for k, v in base.items() if v is not None}


def main() -> None:
    key, other, unpublished = _key("signing"), _key("other-cluster"), _key("unpublished")
    kid = _kid(key)

    def signed(payload: dict[str, Any], with_key: rsa.RSAPrivateKey = key, **header: Any) -> str:
        return jwt.encode(
            payload, with_key, algorithm="RS256", headers={"kid": _kid(with_key), **header}
        )

    good = signed(claims())
    head, _, signature = good.split(".")
    tampered_claims = claims("kube-system", "clusterrole-aggregation-controller")
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_input = f"{_segment({'alg': 'HS256', 'kid': kid, 'typ': 'JWT'})}.{_segment(claims())}"
    hs_signature = _b64(hmac.new(public_pem, hs_input.encode(), hashlib.sha256).digest())

    tokens = {
        "token-valid.jwt": good,
        "token-alg-none.jwt": f"{_segment({'alg': 'none', 'kid': kid, 'typ': 'JWT'})}"
        f".{_segment(claims())}.",
        "token-hs256-signed-with-public-key.jwt": f"{hs_input}.{hs_signature}",
        "token-expired.jwt": signed(claims(iat=NOW - 7200, nbf=NOW - 7200, exp=NOW - 3600)),
        "token-not-yet-valid.jwt": signed(claims(iat=NOW + 3600, nbf=NOW + 3600, exp=NOW + 7200)),
        "token-iat-in-future.jwt": signed(claims(iat=NOW + 3600, nbf=None, exp=NOW + 7200)),
        "token-wrong-audience.jwt": signed(claims(aud=[API_AUDIENCE])),
        "token-wrong-issuer.jwt": signed(claims(iss="https://attacker.example.com")),
        "token-unknown-kid.jwt": signed(claims(), with_key=unpublished),
        "token-other-cluster.jwt": signed(claims(), with_key=other),
        "token-other-key-same-kid.jwt": signed(claims(), with_key=unpublished, kid=kid),
        "token-tampered-payload.jwt": f"{head}.{_segment(tampered_claims)}.{signature}",
        "token-missing-exp.jwt": signed(claims(exp=None)),
        "token-missing-kubernetes-claims.jwt": signed(
            {k: v for k, v in claims().items() if k != "kubernetes.io"}
        ),
        "token-sub-mismatch.jwt": signed(claims(sub="system:serviceaccount:kube-system:default")),
        "token-namespace-with-slash.jwt": signed(claims("prod/sa/admin", "x")),
        "token-not-a-jwt.jwt": "this-is.not-a.jwt",
    }
    for name, token in tokens.items():
        (HERE / name).write_text(token + "\n")
    (HERE / "jwks.json").write_text(json.dumps(_jwks(key), indent=2) + "\n")
    (HERE / "jwks-other-cluster.json").write_text(json.dumps(_jwks(other), indent=2) + "\n")
    (HERE / "issuer.txt").write_text(ISSUER + "\n")
    print(f"wrote {len(tokens)} tokens to {HERE}")


if __name__ == "__main__":
    main()
