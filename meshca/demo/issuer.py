"""What the demo stands in for: a Kubernetes cluster's service-account token issuer, and
an HSM (SoftHSM2, when installed).

The issuer is a P-256 key whose public half is written as a JWK Set file, which the CA
reads (``clusters: [{mode: jwt, jwks_file: ...}]``) exactly as it reads a cluster's keys;
tokens carry the claims of a projected service-account token (Kubernetes 1.29+), so the
CA checks them as it would a real cluster's.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from meshca.demo.children import DemoError

ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "istio-ca"
TOKEN_LIFETIME_SECONDS = 3600

SOFTHSM2_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)
TOKEN_LABEL = "meshca-demo"


class LocalIssuer:
    """Mints projected service-account tokens with a key made for this demo."""

    def __init__(self, jwks_file: Path) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._kid = secrets.token_hex(8)
        self.jwks_file = jwks_file
        jwk = json.loads(ECAlgorithm.to_jwk(self._key.public_key()))
        jwk.update({"kid": self._kid, "alg": "ES256", "use": "sig"})
        jwks_file.write_text(json.dumps({"keys": [jwk]}, indent=2) + "\n")

    def token(self, namespace: str, service_account: str) -> str:
        """A token for ``namespace/service_account``, bound to a made-up pod."""
        now = int(time.time())
        claims = {
            "aud": [AUDIENCE],
            "exp": now + TOKEN_LIFETIME_SECONDS,
            "iat": now,
            "nbf": now,
            "iss": ISSUER,
            "jti": str(uuid.uuid4()),
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
                "pod": {"name": f"{service_account}-demo", "uid": str(uuid.uuid4())},
            },
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self._kid})


def softhsm2_module() -> Path | None:
    """The SoftHSM2 PKCS#11 library, when SoftHSM2 (and its softhsm2-util) is installed."""
    if shutil.which("softhsm2-util") is None:
        return None
    return next((Path(p) for p in SOFTHSM2_MODULES if Path(p).exists()), None)


def init_softhsm2_token(directory: Path, pin: str) -> Path:
    """A SoftHSM2 configuration with one fresh token under ``directory``; its path.

    The token is this demo's alone: its directory is inside the demo's, the PINs are
    random. softhsm2-util takes PINs only as arguments, so for the instant it runs they
    show in its command line; they protect nothing outside this demo.
    """
    tokens = directory / "tokens"
    tokens.mkdir(mode=0o700, parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    util = shutil.which("softhsm2-util")
    if util is None:
        raise DemoError("softhsm2-util is not on PATH")
    result = subprocess.run(
        [
            util,
            "--init-token",
            "--free",
            "--label",
            TOKEN_LABEL,
            "--pin",
            pin,
            "--so-pin",
            secrets.token_hex(8),
        ],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise DemoError(
            f"softhsm2-util could not make a token: {(result.stderr or result.stdout).strip()}"
        )
    return conf
