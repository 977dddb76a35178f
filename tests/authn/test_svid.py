"""SvidAuthenticator: each refusal has its own reason; a retired root no longer renews."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.authn.base import AuthMethod, Credential, Peer
from meshca.authn.svid import SvidAuthenticator
from meshca.errors import AuthenticationError
from meshca.pki import profile
from meshca.pki.keys import KeyAlgorithm
from meshca.spiffe import TrustDomain

TD = TrustDomain("cluster.local")
NOW = datetime.now(UTC)


def _ca(td: TrustDomain = TD) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = KeyAlgorithm.EC_P256.generate()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, profile.build_root(key, td, ttl=timedelta(days=10), now=NOW - timedelta(days=1))


def _leaf(
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    uris: list[str],
    *,
    not_after: datetime = NOW + timedelta(hours=1),
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer[1].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=2))
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[0].public_key()),
            critical=False,
        )
        .sign(issuer[0], hashes.SHA256())
    )


async def _known(leaf: x509.Certificate) -> bool:
    return True


async def _check(leaf: x509.Certificate, bundle: list[x509.Certificate]) -> str:
    authn = SvidAuthenticator(TD, lambda: bundle, _known)
    with pytest.raises(AuthenticationError) as info:
        await authn.authenticate(Credential(), Peer("127.0.0.1:1", (leaf,)))
    return info.value.reason


async def test_valid_svid_attests_its_spiffe_id() -> None:
    root = _ca()
    leaf = _leaf(root, ["spiffe://cluster.local/ns/default/sa/web"])
    attestation = await SvidAuthenticator(TD, lambda: [root[1]], _known).authenticate(
        Credential(), Peer("127.0.0.1:1", (leaf,))
    )
    assert str(attestation.spiffe_id) == "spiffe://cluster.local/ns/default/sa/web"
    assert attestation.method is AuthMethod.X509_SVID
    assert attestation.expires_at == leaf.not_valid_after_utc


async def test_refusals_name_their_reason() -> None:
    root = _ca()
    web = "spiffe://cluster.local/ns/default/sa/web"
    assert await _check(_leaf(root, [web], not_after=NOW - timedelta(minutes=1)), [root[1]]) == (
        "svid_expired"
    )
    retired = _ca()
    assert await _check(_leaf(retired, [web]), [root[1]]) == "svid_untrusted"
    assert await _check(_leaf(root, ["spiffe://other.example/ns/a/sa/b"]), [root[1]]) == (
        "svid_foreign_trust_domain"
    )
    assert await _check(_leaf(root, [web, web + "2"]), [root[1]]) == "svid_malformed"
    assert await _check(_leaf(root, ["https://example.org/x"]), [root[1]]) == "svid_malformed"
    authn = SvidAuthenticator(TD, lambda: [root[1]], _known)
    with pytest.raises(AuthenticationError) as info:
        await authn.authenticate(Credential(), Peer("127.0.0.1:1"))
    assert info.value.reason == "no_client_certificate"


async def test_root_removed_from_bundle_stops_renewal() -> None:
    old, new = _ca(), _ca()
    bundle = [old[1], new[1]]
    authn = SvidAuthenticator(TD, lambda: bundle, _known)
    leaf = _leaf(old, ["spiffe://cluster.local/ns/default/sa/web"])
    await authn.authenticate(Credential(), Peer("127.0.0.1:1", (leaf,)))
    bundle.remove(old[1])
    with pytest.raises(AuthenticationError) as info:
        await authn.authenticate(Credential(), Peer("127.0.0.1:1", (leaf,)))
    assert info.value.reason == "svid_untrusted"


async def test_a_certificate_the_ledger_does_not_know_is_refused() -> None:
    """Chaining to the root is not enough (a leaked intermediate key could mint it)."""
    root = _ca()
    leaf = _leaf(root, ["spiffe://cluster.local/ns/kube-system/sa/admin"])

    async def unknown(cert: x509.Certificate) -> bool:
        return False

    authn = SvidAuthenticator(TD, lambda: [root[1]], unknown)
    with pytest.raises(AuthenticationError) as info:
        await authn.authenticate(Credential(), Peer("127.0.0.1:1", (leaf,)))
    assert info.value.reason == "svid_unknown"
    assert "no ledger record" in info.value.message
