"""The X509-SVID checks on a peer's leaf, one URI SAN defect at a time (no network).

OpenSSL has verified the chain before these checks run; each certificate here is signed
by the trust domain's own intermediate, so only the SVID rules can refuse it. A SPIFFE ID
is compared as it is written: no case folding, no percent-decoding, no normalisation of
``.``, ``..`` or empty segments; an ID that needs any of them is refused."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from meshca.proxy.tls import PeerRefusedError, check_peer
from tests.agent.support import TD, LocalCA
from tests.proxy.bad_certs import _leaf
from tests.proxy.support import FRONTEND

GOOD = str(FRONTEND)  # spiffe://cluster.local/ns/shop/sa/frontend


def der(ca: LocalCA, uris: list[str]) -> bytes:
    _, cert = _leaf(ca.inter_key, ca.intermediate.subject, uris)
    return cert.public_bytes(Encoding.DER)


@pytest.mark.parametrize(
    ("uris", "reason"),
    [
        ([], "has 0 URI SANs; an X509-SVID has exactly one"),
        ([GOOD, "https://frontend.shop.example/"], "has 2 URI SANs"),
        ([GOOD, GOOD], "has 2 URI SANs"),
        (["https://frontend.shop.example/"], "the scheme must be 'spiffe://'"),
        (["SPIFFE://cluster.local/ns/shop/sa/frontend"], "the scheme must be 'spiffe://'"),
        (["spiffe://Cluster.Local/ns/shop/sa/frontend"], "trust domain 'Cluster.Local'"),
        (["spiffe://cluster.local/ns/shop/sa/front%65nd"], "path segment 'front%65nd'"),
        (["spiffe://cluster.local/ns/shop/sa/x%2F..%2Ffrontend"], "has characters '%'"),
        (["spiffe://cluster.local/ns/shop/sa/../sa/frontend"], "has a '.' or '..' segment"),
        (["spiffe://cluster.local/ns/shop/sa/frontend/"], "an empty segment or a trailing '/'"),
        (["spiffe://cluster.local/ns//shop/sa/frontend"], "an empty segment"),
        (["spiffe://cluster.local/ns/shop/sa/frontend?x=1"], "may not have a query"),
        (["spiffe://cluster.local/ns/shop/sa/frontend#x"], "may not have a fragment"),
        (["spiffe://admin@cluster.local/ns/shop/sa/frontend"], "may not have user info"),
        (["spiffe://cluster.local:443/ns/shop/sa/frontend"], "may not have a port"),
        (["spiffe://cluster.local"], "has no path"),
        (["spiffe://other.example/ns/shop/sa/frontend"], "is in trust domain other.example"),
    ],
)
def test_a_uri_san_defect_is_refused_with_its_reason(
    ca: LocalCA, uris: list[str], reason: str
) -> None:
    with pytest.raises(PeerRefusedError) as info:
        check_peer(der(ca, uris), TD)
    assert reason in info.value.reason


def test_a_good_svid_passes_and_other_san_types_are_allowed(ca: LocalCA) -> None:
    """X509-SVID 2: exactly one URI SAN; other SAN types (DNS) may be present."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    assert str(check_peer(der(ca, [GOOD]), TD).spiffe_id) == GOOD
    key, chain = ca.issue(FRONTEND)
    leaf = chain[0]
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(GOOD), x509.DNSName("frontend.shop.example")]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(leaf.issuer)
        .public_key(key.public_key())
        .serial_number(leaf.serial_number)
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
        .add_extension(san, critical=False)
    )
    for ext in leaf.extensions:
        if not isinstance(ext.value, x509.SubjectAlternativeName):
            builder = builder.add_extension(ext.value, ext.critical)
    with_dns = builder.sign(ca.inter_key, hashes.SHA256())
    assert str(check_peer(with_dns.public_bytes(Encoding.DER), TD).spiffe_id) == GOOD


def test_the_validity_period_is_checked_at_each_call_not_cached(ca: LocalCA) -> None:
    cert = der(ca, [GOOD])
    peer = check_peer(cert, TD)
    with pytest.raises(PeerRefusedError, match="expired at"):
        check_peer(cert, TD, now=peer.not_after + timedelta(seconds=1))
    with pytest.raises(PeerRefusedError, match="not valid before"):
        check_peer(cert, TD, now=peer.not_before - timedelta(seconds=1))
    assert check_peer(cert, TD) == peer
