"""What the benchmarks feed the CAs, made before any timing starts.

* A service-account issuer: an RS256 key, its JWK Set in a file (meshca's ``jwt``
  cluster mode reads it locally, so no network is involved), and projected
  service-account tokens with the real claim set (``iss``, ``sub``, ``aud``, ``exp``,
  ``iat``, ``nbf``, ``jti`` and the ``kubernetes.io`` private claim naming the
  namespace, service account and pod), as in tests/fakes/kube.py.
* A pool of identities, each with a P-256 CSR whose single URI SAN is its SPIFFE ID
  (what istio-agent sends), so the load generators spend no time on key generation.
* A cfssl CA: an ECDSA P-256 root made by ``cfssl gencert -initca`` and a signing
  config whose default profile grants server and client auth for 1h.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import RSAAlgorithm

ISSUER = "https://bench.issuer.example"
CLUSTER_ID = "bench"
AUDIENCE = "istio-ca"
TRUST_DOMAIN = "cluster.local"
NAMESPACES = 8


@dataclass(frozen=True, slots=True)
class Identity:
    """One workload: its SPIFFE ID, a CSR naming it and a token proving it."""

    spiffe_id: str
    csr_pem: str
    token: str

    def as_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TokenIssuer:
    """The service-account issuer whose keys meshca reads from ``jwks_file``."""

    key: rsa.RSAPrivateKey
    kid: str
    jwks_file: Path

    @classmethod
    def create(cls, directory: Path) -> TokenIssuer:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # The kid as the API server derives it: unpadded base64url SHA-256 of the SPKI.
        kid = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        jwks = {"keys": [{"use": "sig", **jwk, "kid": kid, "alg": "RS256"}]}
        path = directory / "jwks.json"
        path.write_text(json.dumps(jwks, indent=2))
        return cls(key, kid, path)

    def token(self, namespace: str, service_account: str, *, now: int, ttl: int) -> str:
        """A projected service-account token bound to a (made-up) pod."""
        sa_uid = str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"serviceaccount/{namespace}/{service_account}")
        )
        claims: dict[str, Any] = {
            "aud": [AUDIENCE],
            "exp": now + ttl,
            "iat": now,
            "iss": ISSUER,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": sa_uid},
                "pod": {"name": f"{service_account}-6d4cf56db6-x7k2p", "uid": str(uuid.uuid4())},
            },
            "nbf": now,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})


def make_csr(spiffe_id: str) -> str:
    """A PEM CSR as istio-agent makes one: a fresh P-256 key, the SPIFFE ID as URI SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def make_pool(issuer: TokenIssuer, count: int, *, now: int, token_ttl: int) -> list[Identity]:
    """``count`` identities spread over a few namespaces, one service account each."""
    pool = []
    for i in range(count):
        namespace, service_account = f"bench-{i % NAMESPACES}", f"svc-{i}"
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"
        pool.append(
            Identity(
                spiffe_id=spiffe_id,
                csr_pem=make_csr(spiffe_id),
                token=issuer.token(namespace, service_account, now=now, ttl=token_ttl),
            )
        )
    return pool


def meshca_config(
    directory: Path, issuer: TokenIssuer, extra: dict[str, Any] | None = None
) -> Path:
    """A meshca config with one cluster in local-JWKS mode (JSON is valid YAML)."""
    config: dict[str, Any] = {
        **(extra or {}),
        "trust_domain": TRUST_DOMAIN,
        "clusters": [
            {
                "mode": "jwt",
                "cluster_id": CLUSTER_ID,
                "issuer": ISSUER,
                "jwks_file": str(issuer.jwks_file),
            }
        ],
    }
    path = directory / "meshca.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


@dataclass(frozen=True, slots=True)
class CfsslFiles:
    ca_cert: Path
    ca_key: Path
    config: Path
    tls_cert: Path | None
    tls_key: Path | None


def _cfssl_json(argv: list[str], cwd: Path) -> dict[str, str]:
    try:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{' '.join(argv)} failed: {exc}") from exc
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.decode()[-2000:]}")
    answer: dict[str, str] = json.loads(result.stdout)
    return answer


def cfssl_ca(cfssl: str, directory: Path, *, tls: bool) -> CfsslFiles:
    """An ECDSA P-256 root and a signing config; with ``tls``, a server certificate too."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-csr.json").write_text(
        json.dumps(
            {
                "CN": "meshca bench cfssl root",
                "key": {"algo": "ecdsa", "size": 256},
                "names": [{"O": "meshca bench"}],
                "ca": {"expiry": "87600h"},
            }
        )
    )
    root = _cfssl_json([cfssl, "gencert", "-initca", "ca-csr.json"], directory)
    ca_cert, ca_key = directory / "ca.pem", directory / "ca-key.pem"
    ca_cert.write_text(root["cert"])
    ca_key.write_text(root["key"])
    ca_key.chmod(0o600)
    config = directory / "config.json"
    config.write_text(
        json.dumps(
            {
                "signing": {
                    "default": {
                        "expiry": "1h",
                        "usages": ["digital signature", "server auth", "client auth"],
                    }
                }
            }
        )
    )
    tls_cert = tls_key = None
    if tls:
        (directory / "server-csr.json").write_text(
            json.dumps({"CN": "localhost", "key": {"algo": "ecdsa", "size": 256}})
        )
        server = _cfssl_json(
            [
                cfssl,
                "gencert",
                "-ca",
                str(ca_cert),
                "-ca-key",
                str(ca_key),
                "-config",
                str(config),
                "-hostname",
                "localhost,127.0.0.1",
                "server-csr.json",
            ],
            directory,
        )
        tls_cert, tls_key = directory / "server.pem", directory / "server-key.pem"
        tls_cert.write_text(server["cert"])
        tls_key.write_text(server["key"])
        tls_key.chmod(0o600)
    return CfsslFiles(ca_cert, ca_key, config, tls_cert, tls_key)


def localhost_tls(directory: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for ``localhost`` and its key (PEM files),
    for the null CA of ``issue.py --floor``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "null-ca.pem", directory / "null-ca-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path
