"""Client-side helpers for tests: CSRs, an Istio CA client built from the .proto contract."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from meshca.api._proto import istioca_pb2, istioca_pb2_grpc


def make_csr(
    spiffe_id: str | None = None, key: ec.EllipticCurvePrivateKey | None = None
) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A PEM CSR as istio-agent makes one: a fresh P-256 key, the SPIFFE ID as URI SAN."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if spiffe_id:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
    csr = builder.sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


async def create_certificate(
    channel: grpc.aio.Channel,
    csr: str,
    *,
    token: str | None,
    validity_seconds: int = 0,
    cluster_id: str | None = None,
    timeout: float = 10.0,
) -> list[str]:
    """Call istio.v1.auth.IstioCertificateService/CreateCertificate; return cert_chain."""
    stub = istioca_pb2_grpc.IstioCertificateServiceStub(channel)
    metadata: list[tuple[str, str]] = []
    if token is not None:
        metadata.append(("authorization", f"Bearer {token}"))
    if cluster_id is not None:
        metadata.append(("clusterid", cluster_id))
    response = await stub.CreateCertificate(
        istioca_pb2.IstioCertificateRequest(csr=csr, validity_duration=validity_seconds),
        metadata=metadata,
        timeout=timeout,
    )
    return list(response.cert_chain)


def tls_channel(address: str, root_pem: bytes, server_name: str = "localhost") -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=root_pem)
    return grpc.aio.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", server_name)]
    )


def load_chain(chain: Sequence[str]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(c.encode()) for c in chain]


def verify_with_cryptography(chain: Sequence[str]) -> x509.Certificate:
    """Verify leaf -> intermediate -> root with cryptography's RFC 5280 client verifier."""
    leaf, *intermediates, root = load_chain(chain)
    store = verification.Store([root])
    now = datetime.now(UTC)  # explicit, so freezegun's clock applies
    verifier = verification.PolicyBuilder().store(store).time(now).build_client_verifier()
    verifier.verify(leaf, intermediates)
    return leaf


def verify_with_openssl(chain: Sequence[str], workdir: Path) -> str:
    """``openssl verify`` as an independent peer; returns its output (raises on failure)."""
    leaf, *intermediates, root = chain
    (workdir / "leaf.pem").write_text(leaf)
    (workdir / "inter.pem").write_text("".join(intermediates))
    (workdir / "root.pem").write_text(root)
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-purpose",
            "sslclient",
            "-CAfile",
            str(workdir / "root.pem"),
            "-untrusted",
            str(workdir / "inter.pem"),
            str(workdir / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if result.returncode != 0:
        raise AssertionError(f"openssl verify failed: {result.stdout}{result.stderr}")
    return result.stdout


def uri_sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


async def mesh_create_certificate(
    channel: grpc.aio.Channel,
    csr: str,
    *,
    token: str | None,
    request_id: str,
    validity_seconds: int | None = None,
    timeout: float = 10.0,
) -> list[str]:
    """Call google.security.meshca.v1.MeshCertificateService/CreateCertificate."""
    from google.protobuf import duration_pb2

    from meshca.api._proto import meshca_pb2, meshca_pb2_grpc

    stub = meshca_pb2_grpc.MeshCertificateServiceStub(channel)
    request = meshca_pb2.MeshCertificateRequest(request_id=request_id, csr=csr)
    if validity_seconds is not None:
        request.validity.CopyFrom(duration_pb2.Duration(seconds=validity_seconds))
    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    response = await stub.CreateCertificate(request, metadata=metadata, timeout=timeout)
    return list(response.cert_chain)
