"""Regenerate the GCE instance identity token corpus in this directory.

    .venv/bin/python tests/vectors/gce/make_vectors.py

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
ISSUER = "https://accounts.google.com"
AUDIENCE = "spiffe://cluster.local"  # the CA's default for trust domain cluster.local
PROJECT = "meshca-vms"
WEB_SA = "web@meshca-vms.iam.gserviceaccount.com"
DB_SA = "db@meshca-vms.iam.gserviceaccount.com"


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
    """40 hex digits, the shape of Google's key ids (here: SHA-1 of the DER public key)."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha1(der).hexdigest()


def _jwks(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    """As https://www.googleapis.com/oauth2/v3/certs publishes a key."""
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {
        "keys": [
            {
                "e": jwk["e"],
                "kty": "RSA",
                "alg": "RS256",
                "n": jwk["n"],
                "use": "sig",
                "kid": _kid(key),
            }
        ]
    }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(obj: dict[str, Any]) -> str:
    return _b64(json.dumps(obj, separators=(",", ":"), sort_keys=True).encode())


def compute_engine(**override: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "instance_creation_timestamp": 1_700_000_000,
        "instance_id": "4613265537823984331",
        "instance_name": "web-1",
        "project_id": PROJECT,
        "project_number": 123456789012,
        "zone": "europe-west1-b",
    }
    base.update(override)
    return {k: v for k, v in base.items() if v is not None}


def claims(engine: dict[str, Any] | None = None, **override: Any) -> dict[str, Any]:
    """A ``format=full`` instance identity token's claims, issued at NOW for one hour."""
    base: dict[str, Any] = {
        "aud": AUDIENCE,
        "azp": "104857600123456789012",
        "email": WEB_SA,
        "email_verified": True,
        "exp": NOW + 3600,
        "google": {"compute_engine": engine if engine is not None else compute_engine()},
        "iat": NOW,
        "iss": ISSUER,
        "sub": "104857600123456789012",
    }
    base.update(override)
    return {k: v for k, v in base.items() if v is not None}


def main() -> None:
    key, unpublished = _key("google"), _key("unpublished")
    kid = _kid(key)

    def signed(
        payload: dict[str, Any],
        with_key: rsa.RSAPrivateKey = key,
        algorithm: str = "RS256",
        **header: Any,
    ) -> str:
        return jwt.encode(
            payload,
            with_key,
            algorithm=algorithm,
            headers={"kid": _kid(with_key), "typ": "JWT", **header},
        )

    good = signed(claims())
    head, _, signature = good.split(".")
    tampered = claims(compute_engine(project_id="meshca-prod-admin"))
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_input = f"{_segment({'alg': 'HS256', 'kid': kid, 'typ': 'JWT'})}.{_segment(claims())}"
    hs_signature = _b64(hmac.new(public_pem, hs_input.encode(), hashlib.sha256).digest())
    licenses = [str(6_000_000_000_000_000_000 + i) for i in range(500)]

    tokens = {
        "token-valid.jwt": good,
        "token-valid-bare-issuer.jwt": signed(claims(iss="accounts.google.com")),
        "token-valid-db-vm.jwt": signed(claims(compute_engine(instance_name="db-1"), email=DB_SA)),
        "token-wrong-audience.jwt": signed(claims(aud="https://meshca.example.com")),
        "token-wrong-issuer.jwt": signed(claims(iss="https://attacker.example.com")),
        "token-expired.jwt": signed(claims(iat=NOW - 7200, exp=NOW - 3600)),
        "token-iat-in-future.jwt": signed(claims(iat=NOW + 3600, exp=NOW + 7200)),
        "token-missing-iat.jwt": signed(claims(iat=None)),
        "token-unknown-kid.jwt": signed(claims(), with_key=unpublished),
        "token-other-key-same-kid.jwt": signed(claims(), with_key=unpublished, kid=kid),
        "token-tampered-payload.jwt": f"{head}.{_segment(tampered)}.{signature}",
        "token-alg-none.jwt": f"{_segment({'alg': 'none', 'kid': kid, 'typ': 'JWT'})}"
        f".{_segment(claims())}.",
        "token-hs256-signed-with-public-key.jwt": f"{hs_input}.{hs_signature}",
        "token-alg-rs512.jwt": signed(claims(), algorithm="RS512"),
        "token-project-not-allowed.jwt": signed(
            claims(compute_engine(project_id="someone-elses-project"))
        ),
        "token-no-mapping-rule.jwt": signed(claims(compute_engine(instance_name="db-1"))),
        "token-email-not-verified.jwt": signed(
            claims(compute_engine(instance_name="db-1"), email=DB_SA, email_verified=False)
        ),
        "token-format-standard.jwt": signed(claims(google=None)),
        "token-missing-google-claim.jwt": signed(claims(compute_engine(instance_id=None))),
        "token-google-claim-without-compute-engine.jwt": signed(
            claims(google={"cloud_run": {"service": "web"}})
        ),
        "token-invalid-instance-name.jwt": signed(
            claims(compute_engine(instance_name="web-1/../../admin"))
        ),
        "token-oversize.jwt": signed(claims(compute_engine(license_id=licenses))),
        "token-padded-signature.jwt": good + "==",
        "token-not-a-jwt.jwt": "this-is.not-a.jwt",
    }
    for name, token in tokens.items():
        (HERE / name).write_text(token + "\n")
    (HERE / "jwks.json").write_text(json.dumps(_jwks(key), indent=2) + "\n")
    print(f"wrote {len(tokens)} tokens to {HERE}")


if __name__ == "__main__":
    main()
