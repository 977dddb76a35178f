"""MeshCertificateService: same authentication, request_id idempotency, status codes."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from meshca.api._proto.meshca_pb2 import MeshCertificateRequest
from tests.api.conftest import CA
from tests.support import (
    load_chain,
    make_csr,
    mesh_create_certificate,
    uri_sans,
    verify_with_cryptography,
    verify_with_openssl,
)

WEB_ID = "spiffe://cluster.local/ns/default/sa/web"


async def test_mesh_ca_client_gets_a_verifiable_chain(ca: CA, tmp_path: Path) -> None:
    chain = await mesh_create_certificate(
        ca.channel,
        make_csr(WEB_ID)[1],
        token=ca.kube.mint_token("default", "web"),
        request_id=str(uuid.uuid4()),
        validity_seconds=600,
    )
    leaf = verify_with_cryptography(chain)
    assert "OK" in verify_with_openssl(chain, tmp_path)
    assert uri_sans(leaf) == [WEB_ID]
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(minutes=10) <= life <= timedelta(minutes=16)
    _, metrics = await ca.get("/metrics")
    assert 'meshca_certificates_issued_total{api="meshca",method="k8s-jwt"} 1.0' in metrics


async def test_retry_with_same_request_id_and_csr_returns_the_same_chain(ca: CA) -> None:
    csr = make_csr(WEB_ID)[1]
    request_id = str(uuid.uuid4())
    token = ca.kube.mint_token("default", "web")
    before = ca.ledger_rows()
    first = await mesh_create_certificate(ca.channel, csr, token=token, request_id=request_id)
    again = await mesh_create_certificate(ca.channel, csr, token=token, request_id=request_id)
    assert again == first
    assert ca.ledger_rows() == before + 1


async def test_concurrent_retries_get_one_certificate(ca: CA) -> None:
    csr = make_csr(WEB_ID)[1]
    request_id = str(uuid.uuid4())
    token = ca.kube.mint_token("default", "web")
    before = ca.ledger_rows()
    chains = await asyncio.gather(
        *(
            mesh_create_certificate(ca.channel, csr, token=token, request_id=request_id)
            for _ in range(8)
        )
    )
    assert all(chain == chains[0] for chain in chains)
    assert ca.ledger_rows() == before + 1


async def test_same_request_id_with_another_csr_is_already_exists(ca: CA) -> None:
    request_id = str(uuid.uuid4())
    token = ca.kube.mint_token("default", "web")
    await mesh_create_certificate(
        ca.channel, make_csr(WEB_ID)[1], token=token, request_id=request_id
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh_create_certificate(
            ca.channel, make_csr(WEB_ID)[1], token=token, request_id=request_id
        )
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "different CSR" in (info.value.details() or "")


async def test_request_ids_belong_to_their_identity(ca: CA) -> None:
    """Another workload reusing my request id gets its own certificate, not mine."""
    request_id = str(uuid.uuid4())
    mine = await mesh_create_certificate(
        ca.channel,
        make_csr(None)[1],
        token=ca.kube.mint_token("default", "web"),
        request_id=request_id,
    )
    theirs = await mesh_create_certificate(
        ca.channel,
        make_csr(None)[1],
        token=ca.kube.mint_token("default", "db"),
        request_id=request_id,
    )
    assert uri_sans(load_chain(theirs)[0]) == ["spiffe://cluster.local/ns/default/sa/db"]
    assert theirs[0] != mine[0]


@pytest.mark.parametrize(
    "request_id", ["", "not-a-uuid", "00000000-0000-0000-0000-000000000000", "1234"]
)
async def test_request_id_must_be_a_non_zero_uuid(ca: CA, request_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh_create_certificate(
            ca.channel,
            make_csr(WEB_ID)[1],
            token=ca.kube.mint_token("default", "web"),
            request_id=request_id,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be a UUID other than the zero UUID" in (info.value.details() or "")


async def test_mesh_ca_refuses_without_a_token(ca: CA) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh_create_certificate(
            ca.channel, make_csr(WEB_ID)[1], token=None, request_id=str(uuid.uuid4())
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_sub_second_validity_gets_at_least_a_second(ca: CA) -> None:
    from google.protobuf import duration_pb2

    from meshca.api._proto import meshca_pb2, meshca_pb2_grpc

    stub = meshca_pb2_grpc.MeshCertificateServiceStub(ca.channel)
    request = meshca_pb2.MeshCertificateRequest(
        request_id=str(uuid.uuid4()),
        csr=make_csr(WEB_ID)[1],
        validity=duration_pb2.Duration(seconds=0, nanos=500_000_000),
    )
    token = ca.kube.mint_token("default", "web")
    response = await stub.CreateCertificate(
        request, metadata=[("authorization", f"Bearer {token}")], timeout=10
    )
    leaf = load_chain(list(response.cert_chain))[0]
    assert leaf.not_valid_after_utc > leaf.not_valid_before_utc


async def _mesh_refusal(ca: CA, body: bytes | MeshCertificateRequest) -> grpc.aio.AioRpcError:
    token = ca.kube.mint_token("default", "web")
    data = body if isinstance(body, bytes) else body.SerializeToString()
    call = ca.channel.unary_unary(
        "/google.security.meshca.v1.MeshCertificateService/CreateCertificate"
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(data, metadata=[("authorization", f"Bearer {token}")], timeout=10)
    return info.value


@pytest.mark.parametrize(
    ("seconds", "nanos", "rule"),
    [
        (
            0,
            2_000_000_000,
            "nanos is 2000000000; allowed: -999999999 to 999999999 "
            "(carry whole seconds into seconds)",
        ),
        (
            600,
            -1,
            "seconds (600) and nanos (-1) have different signs; they must have the same "
            "sign, or one of them be zero",
        ),
        (
            -600,
            1,
            "seconds (-600) and nanos (1) have different signs; they must have the same "
            "sign, or one of them be zero",
        ),
        (315_576_000_001, 0, "seconds is 315576000001; allowed: -315576000000 to 315576000000"),
    ],
)
async def test_invalid_validity_duration_is_refused_naming_the_rule(
    ca: CA, seconds: int, nanos: int, rule: str
) -> None:
    request = MeshCertificateRequest(
        request_id=str(uuid.uuid4()),
        csr=make_csr(WEB_ID)[1],
        validity=Duration(seconds=seconds, nanos=nanos),
    )
    before = ca.ledger_rows()
    err = await _mesh_refusal(ca, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == f"validity is not a valid google.protobuf.Duration: {rule}"
    assert ca.ledger_rows() == before
    _, metrics = await ca.get("/metrics")
    assert 'meshca_requests_refused_total{api="meshca",reason="invalid_validity"} 1.0' in metrics


async def test_negative_validity_is_refused(ca: CA) -> None:
    request = MeshCertificateRequest(
        request_id=str(uuid.uuid4()),
        csr=make_csr(WEB_ID)[1],
        validity=Duration(seconds=-600, nanos=-5),
    )
    err = await _mesh_refusal(ca, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.details() or "").startswith("validity is negative (-600s); send a positive")


async def test_invalid_utf8_in_request_id_is_invalid_argument(ca: CA) -> None:
    body = bytes([0x0A, 4]) + b"\xc3\x28ab"  # request_id = 1, not UTF-8
    err = await _mesh_refusal(ca, body)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.details() or "").startswith(
        "request is not a valid google.security.meshca.v1.MeshCertificateRequest: "
        "String field had bad UTF-8"
    )
