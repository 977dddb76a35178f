"""IstioCertificateService over real gRPC+TLS: issuance, refusals, status codes, metrics."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import struct_pb2

from meshca.api._proto import istioca_pb2, istioca_pb2_grpc
from tests.api.conftest import CA, StartCA
from tests.support import (
    create_certificate,
    load_chain,
    make_csr,
    uri_sans,
    verify_with_cryptography,
    verify_with_openssl,
)

WEB_ID = "spiffe://cluster.local/ns/default/sa/web"


async def test_istio_client_gets_a_verifiable_chain(ca: CA, tmp_path: Path) -> None:
    token = ca.kube.mint_token("default", "web", pod_name="web-1")
    key, csr = make_csr(WEB_ID)
    before = ca.ledger_rows()

    chain = await create_certificate(ca.channel, csr, token=token)

    assert len(chain) == 3
    leaf, inter, root = load_chain(chain)
    assert root.public_bytes(serialization.Encoding.PEM) == ca.root_pem
    assert inter.issuer == root.subject and leaf.issuer == inter.subject
    assert uri_sans(leaf) == [WEB_ID]
    assert leaf.public_key() == key.public_key()
    verify_with_cryptography(chain)
    assert "OK" in verify_with_openssl(chain, tmp_path)
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(hours=1) <= life <= timedelta(hours=1, minutes=10)  # default TTL + skew
    assert ca.ledger_rows() == before + 1


async def test_csr_without_san_gets_the_attested_identity(ca: CA) -> None:
    token = ca.kube.mint_token("payments", "api")
    _, csr = make_csr(None)
    chain = await create_certificate(ca.channel, csr, token=token)
    assert uri_sans(load_chain(chain)[0]) == ["spiffe://cluster.local/ns/payments/sa/api"]


@pytest.mark.parametrize(
    ("requested", "expected"),
    [(0, timedelta(hours=1)), (600, timedelta(minutes=10)), (48 * 3600, timedelta(hours=24))],
)
async def test_requested_validity_is_clamped(ca: CA, requested: int, expected: timedelta) -> None:
    _, csr = make_csr(WEB_ID)
    chain = await create_certificate(
        ca.channel, csr, token=ca.kube.mint_token("default", "web"), validity_seconds=requested
    )
    leaf = load_chain(chain)[0]
    issued_at = leaf.not_valid_before_utc + timedelta(minutes=5)  # notBefore is backdated
    assert abs((leaf.not_valid_after_utc - issued_at) - expected) < timedelta(seconds=30)


def _csr_with(key: ec.EllipticCurvePrivateKey, *extensions: x509.ExtensionType) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


async def _refusal(ca: CA, csr: str, **kwargs: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await create_certificate(ca.channel, csr, **kwargs)  # type: ignore[arg-type]
    return info.value


async def test_refusals_map_to_status_codes_and_write_no_ledger_row(ca: CA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    good_csr = make_csr(WEB_ID, key)[1]
    token = ca.kube.mint_token("default", "web")
    cases = [
        ("no token", good_csr, {"token": None}, grpc.StatusCode.UNAUTHENTICATED, "token"),
        (
            "expired token",
            good_csr,
            {"token": ca.kube.mint_token("default", "web", ttl=timedelta(seconds=-3600))},
            grpc.StatusCode.UNAUTHENTICATED,
            "expired",
        ),
        (
            "wrong audience",
            good_csr,
            {"token": ca.kube.mint_token("default", "web", audiences=["vault"])},
            grpc.StatusCode.UNAUTHENTICATED,
            "audience",
        ),
        (
            "unknown cluster",
            good_csr,
            {"token": token, "cluster_id": "mars"},
            grpc.StatusCode.UNAUTHENTICATED,
            "mars",
        ),
        (
            "other identity",
            make_csr("spiffe://cluster.local/ns/kube-system/sa/admin", key)[1],
            {"token": token},
            grpc.StatusCode.PERMISSION_DENIED,
            "spiffe://cluster.local/ns/kube-system/sa/admin",
        ),
        (
            "CA:true",
            _csr_with(key, x509.BasicConstraints(ca=True, path_length=None)),
            {"token": token},
            grpc.StatusCode.INVALID_ARGUMENT,
            "CA",
        ),
        (
            "DNS SAN",
            _csr_with(key, x509.SubjectAlternativeName([x509.DNSName("evil.example")])),
            {"token": token},
            grpc.StatusCode.INVALID_ARGUMENT,
            "DNS",
        ),
        ("garbage", "not a csr", {"token": token}, grpc.StatusCode.INVALID_ARGUMENT, "CSR"),
        ("oversize", "A" * 20_000, {"token": token}, grpc.StatusCode.INVALID_ARGUMENT, "16"),
    ]
    before = ca.ledger_rows()
    for name, csr, kwargs, code, needle in cases:
        err = await _refusal(ca, csr, **kwargs)
        assert err.code() == code, f"{name}: {err.code()} {err.details()}"
        assert needle.lower() in (err.details() or "").lower(), f"{name}: {err.details()}"
    assert ca.ledger_rows() == before

    status, metrics = await ca.get("/metrics")
    assert status == 200
    assert 'meshca_authentication_failures_total{reason="missing_token"} 1.0' in metrics
    assert 'meshca_requests_refused_total{api="istio",reason="csr_requests_ca"} 1.0' in metrics
    assert 'meshca_certificates_issued_total{api="istio"' not in metrics


async def test_impersonation_metadata_is_refused(ca: CA) -> None:
    stub = istioca_pb2_grpc.IstioCertificateServiceStub(ca.channel)
    metadata = struct_pb2.Struct()
    metadata.update({"ImpersonatedIdentity": "spiffe://cluster.local/ns/x/sa/y"})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateCertificate(
            istioca_pb2.IstioCertificateRequest(csr=make_csr(WEB_ID)[1], metadata=metadata),
            metadata=[("authorization", f"Bearer {ca.kube.mint_token('default', 'web')}")],
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "impersonat" in (info.value.details() or "")
    assert "node_agents is not configured" in (info.value.details() or "")
    _, metrics = await ca.get("/metrics")
    reason = 'reason="impersonation_not_enabled"'
    assert f'meshca_requests_refused_total{{api="istio",{reason}}} 1.0' in metrics


async def test_metrics_count_issuance_and_expose_expiry(ca: CA) -> None:
    await create_certificate(
        ca.channel, make_csr(WEB_ID)[1], token=ca.kube.mint_token("default", "web")
    )
    _, metrics = await ca.get("/metrics")
    assert 'meshca_certificates_issued_total{api="istio",method="k8s-jwt"} 1.0' in metrics
    assert 'meshca_issuance_seconds_count{api="istio",outcome="issued"} 1.0' in metrics
    root_line = next(x for x in metrics.splitlines() if x.startswith("meshca_root_expiry_seconds"))
    assert float(root_line.split()[-1]) > 9 * 365 * 86400
    inter_line = next(
        x for x in metrics.splitlines() if x.startswith("meshca_intermediate_expiry_seconds")
    )
    assert 47 * 3600 < float(inter_line.split()[-1]) <= 48 * 3600


async def test_bundle_health_and_readiness(ca: CA) -> None:
    status, pem = await ca.get("/v1/bundle")
    assert status == 200 and pem.encode() == ca.root_pem
    status, body = await ca.get("/v1/bundle?format=spiffe")
    assert status == 200 and '"use": "x509-svid"' in body
    status, body = await ca.get("/v1/bundle?format=der")
    assert status == 400 and "unknown format" in body
    assert (await ca.get("/healthz"))[0] == 200
    assert (await ca.get("/readyz")) == (200, "ready\n")


async def test_readiness_names_the_failing_dependency(
    ca: CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down() -> list[str]:
        return ["checking the ledger failed on sqlite:///x: unreachable"]

    monkeypatch.setattr(ca.server.store, "ledger_problems", down)
    status, body = await ca.get("/readyz")
    assert status == 503
    assert "database: checking the ledger failed on sqlite:///x: unreachable" in body


async def test_tokenreview_mode_and_cluster_selection(
    start_ca: StartCA, kube: object, tmp_path: Path
) -> None:
    from tests.fakes.kube import FakeKubeApi

    assert isinstance(kube, FakeKubeApi)
    async with FakeKubeApi() as west:
        reviewer = tmp_path / "reviewer-token"
        reviewer.write_text("meshca-reviewer-token\n")
        ca = await start_ca(
            clusters=[
                {"mode": "jwt", "cluster_id": "east", "issuer": kube.issuer},
                {
                    "mode": "tokenreview",
                    "cluster_id": "west",
                    "api_server": west.url,
                    "credentials_file": str(reviewer),
                },
            ]
        )
        east_token = kube.mint_token("shop", "cart")
        west_token = west.mint_token("shop", "cart", pod_name="cart-7", pod_uid="u-1")
        east = await create_certificate(ca.channel, make_csr(None)[1], token=east_token)
        reviews = west.tokenreview_calls  # the start-up probe's, long done
        west_chain = await create_certificate(
            ca.channel, make_csr(None)[1], token=west_token, cluster_id="west"
        )
        assert west.tokenreview_calls == reviews + 1
        assert west.last_authorization == "Bearer meshca-reviewer-token"
        for chain in (east, west_chain):
            assert uri_sans(load_chain(chain)[0]) == ["spiffe://cluster.local/ns/shop/sa/cart"]
        err = await _refusal(ca, make_csr(None)[1], token=west_token)  # east by default
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_plaintext_for_local_development(start_ca: StartCA) -> None:
    ca = await start_ca(plaintext=True)
    chain = await create_certificate(
        ca.channel, make_csr(WEB_ID)[1], token=ca.kube.mint_token("default", "web")
    )
    assert len(chain) == 3


async def test_server_certificate_names_the_ca(ca: CA) -> None:
    assert ca.server.server_cert is not None
    leaf = load_chain(ca.server.server_cert.chain_pem)[0]
    assert uri_sans(leaf) == ["spiffe://cluster.local/meshca"]
    dns = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert dns.get_values_for_type(x509.DNSName) == ["localhost"]


async def test_without_clusters_every_request_is_refused_saying_why(
    start_ca: StartCA, kube: object
) -> None:
    ca = await start_ca(clusters=[])
    err = await _refusal(ca, make_csr(WEB_ID)[1], token="x.y.z")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no Kubernetes cluster configured" in (err.details() or "")


async def test_absurd_validity_is_clamped_not_a_crash(ca: CA) -> None:
    token = ca.kube.mint_token("default", "web")
    chain = await create_certificate(
        ca.channel, make_csr(WEB_ID)[1], token=token, validity_seconds=2**62
    )
    leaf = load_chain(chain)[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(hours=24, minutes=5)


async def test_unreachable_issuer_is_unavailable_without_internal_details(
    start_ca: StartCA, kube: object
) -> None:
    from tests.fakes.kube import FakeKubeApi

    assert isinstance(kube, FakeKubeApi)
    kube.fail_jwks = 503  # the start-up probe gets no keys
    ca = await start_ca()
    token = kube.mint_token("default", "web")
    await kube.stop()  # before the CA ever fetched the issuer's keys
    err = await _refusal(ca, make_csr(WEB_ID)[1], token=token)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    details = err.details() or ""
    assert "retry later" in details
    assert "127.0.0.1" not in details and "http" not in details


@pytest.mark.parametrize(
    ("header", "advice"),
    [
        ("authorization", "send exactly one ('authorization: Bearer <token>')"),
        ("clusterid", "send at most one"),
    ],
)
async def test_a_repeated_credential_header_is_refused_and_counted(
    ca: CA, header: str, advice: str
) -> None:
    """Which of two headers a proxy or server honours differs: refuse, never pick one."""
    token = ca.kube.mint_token("default", "web")
    metadata = [("authorization", f"Bearer {token}")]
    if header == "authorization":
        metadata.insert(0, ("authorization", "Bearer not-a-token"))
    else:
        metadata += [("clusterid", "Kubernetes"), ("clusterid", "mars")]
    stub = istioca_pb2_grpc.IstioCertificateServiceStub(ca.channel)
    before = ca.ledger_rows()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateCertificate(
            istioca_pb2.IstioCertificateRequest(csr=make_csr(WEB_ID)[1]),
            metadata=metadata,
            timeout=10,
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details() == f"the request has 2 {header} headers; {advice}"
    assert ca.ledger_rows() == before
    _, metrics = await ca.get("/metrics")
    assert f'meshca_authentication_failures_total{{reason="duplicate_{header}"}} 1.0' in metrics


def _string_field(number: int, value: bytes) -> bytes:
    """A protobuf length-delimited field (value shorter than 128 bytes)."""
    assert len(value) < 128
    return bytes([number << 3 | 2, len(value)]) + value


async def test_invalid_utf8_in_a_string_field_is_invalid_argument(ca: CA) -> None:
    token = ca.kube.mint_token("default", "web")
    call = ca.channel.unary_unary("/istio.v1.auth.IstioCertificateService/CreateCertificate")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(
            _string_field(1, b"-----BEGIN \xff\xfe"),  # csr = 1, not UTF-8
            metadata=[("authorization", f"Bearer {token}")],
            timeout=10,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        "request is not a valid istio.v1.auth.IstioCertificateRequest: String field had bad "
        "UTF-8; encode it with a protobuf library (string fields must be UTF-8)"
    )
    _, metrics = await ca.get("/metrics")
    assert 'meshca_requests_refused_total{api="istio",reason="undecodable_request"} 1.0' in metrics


async def test_negative_validity_duration_gets_the_default_as_with_istio(ca: CA) -> None:
    chain = await create_certificate(
        ca.channel,
        make_csr(WEB_ID)[1],
        token=ca.kube.mint_token("default", "web"),
        validity_seconds=-600,
    )
    leaf = load_chain(chain)[0]
    issued_at = leaf.not_valid_before_utc + timedelta(minutes=5)  # notBefore is backdated
    assert abs((leaf.not_valid_after_utc - issued_at) - timedelta(hours=1)) < timedelta(seconds=30)
