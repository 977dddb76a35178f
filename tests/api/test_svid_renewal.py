"""Renewal with the X509-SVID a workload holds, on the mTLS port, without a token."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.pki import profile
from meshca.pki.keys import KeyAlgorithm
from meshca.spiffe import TrustDomain
from tests.api.conftest import CA
from tests.support import create_certificate, load_chain, make_csr, uri_sans

WEB_ID = "spiffe://cluster.local/ns/default/sa/web"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def mtls_channel(ca: CA, key: ec.EllipticCurvePrivateKey, chain: list[str]) -> grpc.aio.Channel:
    assert ca.server.mtls_port is not None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.root_pem,
        private_key=_key_pem(key),
        certificate_chain="".join(chain[:-1]).encode(),
    )
    return grpc.aio.secure_channel(
        f"127.0.0.1:{ca.server.mtls_port}",
        credentials,
        options=[("grpc.ssl_target_name_override", "localhost")],
    )


async def test_svid_holder_renews_without_a_token(ca: CA) -> None:
    key, csr = make_csr(WEB_ID)
    first = await create_certificate(ca.channel, csr, token=ca.kube.mint_token("default", "web"))

    new_key, new_csr = make_csr(WEB_ID)
    async with mtls_channel(ca, key, first) as channel:
        renewed = await create_certificate(channel, new_csr, token=None)

    leaf = load_chain(renewed)[0]
    assert uri_sans(leaf) == [WEB_ID]
    assert leaf.public_key() == new_key.public_key()
    assert leaf.serial_number != load_chain(first)[0].serial_number
    _, metrics = await ca.get("/metrics")
    assert 'meshca_certificates_issued_total{api="istio",method="x509-svid"} 1.0' in metrics


async def test_svid_renewal_cannot_change_identity(ca: CA) -> None:
    key, csr = make_csr(WEB_ID)
    first = await create_certificate(ca.channel, csr, token=ca.kube.mint_token("default", "web"))
    async with mtls_channel(ca, key, first) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await create_certificate(
                channel, make_csr("spiffe://cluster.local/ns/default/sa/db")[1], token=None
            )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_expired_svid_is_refused_at_the_handshake(ca: CA) -> None:
    issuing = ca.server.authority.current_issuing_ca
    assert issuing is not None
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    assert isinstance(issuing.key, ec.EllipticCurvePrivateKey)
    expired = (  # by hand: the profile never backdates past the issuer's notBefore
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuing.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=2))
        .not_valid_after(now - timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(WEB_ID)]), critical=True
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(issuing.key, hashes.SHA256())
    )
    chain = [
        expired.public_bytes(serialization.Encoding.PEM).decode(),
        issuing.certificate.public_bytes(serialization.Encoding.PEM).decode(),
        ca.root_pem.decode(),
    ]
    async with mtls_channel(ca, key, chain) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await create_certificate(channel, make_csr(WEB_ID)[1], token=None, timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_svid_of_another_ca_is_refused_at_the_handshake(ca: CA) -> None:
    other_root_key = KeyAlgorithm.EC_P256.generate()
    other_td = TrustDomain("other.example")
    now = datetime.now(UTC)
    other_root = profile.build_root(other_root_key, other_td, ttl=timedelta(days=1), now=now)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = profile.build_svid(
        other_root_key,
        other_root,
        key.public_key(),
        other_td.workload("default", "web"),
        not_after=now + timedelta(hours=1),
        now=now,
    )
    pems = [c.public_bytes(serialization.Encoding.PEM).decode() for c in (leaf, other_root)]
    async with mtls_channel(ca, key, [pems[0], pems[1]]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await create_certificate(channel, make_csr(WEB_ID)[1], token=None, timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_port_requires_a_client_certificate(ca: CA) -> None:
    assert ca.server.mtls_port is not None
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{ca.server.mtls_port}",
        grpc.ssl_channel_credentials(root_certificates=ca.root_pem),
        options=[("grpc.ssl_target_name_override", "localhost")],
    )
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await create_certificate(
                channel,
                make_csr(WEB_ID)[1],
                token=ca.kube.mint_token("default", "web"),
                timeout=5,
            )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_svid_renewals_are_ledgered_with_their_method(ca: CA) -> None:
    key, csr = make_csr(WEB_ID)
    first = await create_certificate(ca.channel, csr, token=ca.kube.mint_token("default", "web"))
    async with mtls_channel(ca, key, first) as channel:
        renewed = await create_certificate(channel, make_csr(WEB_ID)[1], token=None)
    serial = format(load_chain(renewed)[0].serial_number, "x")
    from sqlmodel import Session, select

    from meshca.store import LedgerEntry

    with Session(ca.server.store._engine) as session:
        row = session.exec(select(LedgerEntry).where(LedgerEntry.serial_hex == serial)).one()
    assert row.auth_method == "x509-svid"
    assert row.evidence.startswith("x509:serial:")


async def test_certificate_not_in_the_ledger_cannot_renew(ca: CA) -> None:
    """A leaf signed with the CA's own intermediate key but never ledgered (as a leaked
    key could make) chains fine, passes the handshake, and is still refused."""
    issuing = ca.server.authority.current_issuing_ca
    assert issuing is not None
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    admin = TrustDomain("cluster.local").workload("kube-system", "admin")
    forged = profile.build_svid(
        issuing.signer,
        issuing.certificate,
        key.public_key(),
        admin,
        not_after=now + timedelta(hours=1),
        now=now,
    )
    chain = [
        forged.public_bytes(serialization.Encoding.PEM).decode(),
        issuing.certificate_pem,
        ca.root_pem.decode(),
    ]
    async with mtls_channel(ca, key, chain) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await create_certificate(channel, make_csr(str(admin))[1], token=None)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not one this CA issued" in (info.value.details() or "")
