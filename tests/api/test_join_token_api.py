"""Join tokens over real gRPC+TLS, on both APIs: issuance, refusals, ledger, metrics."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from meshca.authn.join_token import new_token, token_digest
from meshca.store import JoinToken
from tests.api.conftest import CA
from tests.support import (
    create_certificate,
    load_chain,
    make_csr,
    mesh_create_certificate,
    uri_sans,
    verify_with_cryptography,
)

VM_ID = "spiffe://cluster.local/vm/db-1"


def _create(ca: CA, spiffe_id: str = VM_ID) -> str:
    token = new_token()
    now = datetime.now(UTC)
    record = JoinToken(
        token_sha256=token_digest(token),
        spiffe_id=spiffe_id,
        created_at=now,
        expires_at=now + timedelta(hours=1),
        created_by="test",
    )
    ca.server.store.add_join_tokens([record])
    return token


async def _refusal(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def test_both_apis_issue_once_per_token_and_say_why_a_second_use_fails(ca: CA) -> None:
    istio_token, mesh_token = _create(ca), _create(ca)
    _, csr = make_csr(None)

    chain = await create_certificate(ca.channel, csr, token=istio_token)
    verify_with_cryptography(chain)
    assert uri_sans(load_chain(chain)[0]) == [VM_ID]
    chain = await mesh_create_certificate(
        ca.channel, csr, token=mesh_token, request_id=str(uuid.uuid4())
    )
    assert uri_sans(load_chain(chain)[0]) == [VM_ID]

    rows = ca.server.store.list_ledger(limit=2)
    assert [r.auth_method for r in rows] == ["join-token", "join-token"]
    assert rows[0].evidence.startswith(f"join-token:id:{token_digest(mesh_token)[:16]}")

    again = await _refusal(create_certificate(ca.channel, csr, token=istio_token))
    assert again.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in (again.details() or "")
    again = await _refusal(
        mesh_create_certificate(ca.channel, csr, token=mesh_token, request_id=str(uuid.uuid4()))
    )
    assert again.code() == grpc.StatusCode.UNAUTHENTICATED

    _, metrics = await ca.get("/metrics")
    assert 'meshca_authentication_failures_total{reason="join_token_used"} 2.0' in metrics
    assert 'meshca_certificates_issued_total{api="istio",method="join-token"} 1.0' in metrics
    assert 'meshca_certificates_issued_total{api="meshca",method="join-token"} 1.0' in metrics


async def test_a_csr_for_another_identity_is_unauthenticated(ca: CA) -> None:
    token = _create(ca)
    _, csr = make_csr("spiffe://cluster.local/ns/default/sa/admin")
    refused = await _refusal(create_certificate(ca.channel, csr, token=token))
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert VM_ID in (refused.details() or "")
    _, metrics = await ca.get("/metrics")
    assert 'meshca_authentication_failures_total{reason="join_token_wrong_identity"} 1.0' in (
        metrics
    )
    _, csr = make_csr(VM_ID)  # not spent by the refusal
    assert uri_sans(load_chain(await create_certificate(ca.channel, csr, token=token))[0]) == [
        VM_ID
    ]


async def test_an_unknown_token_is_unauthenticated(ca: CA) -> None:
    _, csr = make_csr(None)
    refused = await _refusal(create_certificate(ca.channel, csr, token=new_token()))
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no join token" in (refused.details() or "")
