"""Trust bundles: SPIFFE bundle JSON shape (Trust Domain and Bundle 4, X509-SVID 6), PEM."""

from __future__ import annotations

import base64
import copy
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from meshca.pki import profile
from meshca.pki.bundle import bundle_pem, parse_spiffe_bundle, spiffe_bundle
from meshca.pki.keys import KeyAlgorithm
from meshca.spiffe import TrustDomain
from tests.pki.helpers import key

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
TD = TrustDomain("cluster.local")


@pytest.fixture(scope="module")
def roots() -> list[x509.Certificate]:
    """Three roots during a rotation, one per key family meshca accepts."""
    return [
        profile.build_root(key(alg, 7), TD, ttl=timedelta(days=30), now=NOW)
        for alg in (KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P384, KeyAlgorithm.RSA_2048)
    ]


@pytest.fixture(scope="module")
def doc(roots: list[x509.Certificate]) -> dict[str, object]:
    return spiffe_bundle(TD, roots, sequence=7, refresh_hint=timedelta(minutes=5))


def entries(doc: dict[str, object]) -> list[dict[str, object]]:
    keys = doc["keys"]
    assert isinstance(keys, list)
    return keys


def test_one_jwk_per_ca_certificate(doc: dict[str, object], roots: list[x509.Certificate]) -> None:
    assert len(entries(doc)) == len(roots)
    for entry, root in zip(entries(doc), roots, strict=True):
        assert entry["use"] == "x509-svid"
        assert "kid" not in entry  # X509-SVID 6.1: MUST NOT be set
        x5c = entry["x5c"]
        assert isinstance(x5c, list) and len(x5c) == 1
        assert base64.b64decode(x5c[0], validate=True) == root.public_bytes(
            serialization.Encoding.DER
        )


def test_jwk_holds_only_the_key_members(doc: dict[str, object]) -> None:
    ec256, ec384, rsa2048 = entries(doc)
    assert set(ec256) == {"kty", "crv", "x", "y", "use", "x5c"}
    assert (ec256["kty"], ec256["crv"], ec384["crv"]) == ("EC", "P-256", "P-384")
    assert set(rsa2048) == {"kty", "n", "e", "use", "x5c"}
    assert (rsa2048["kty"], rsa2048["e"]) == ("RSA", "AQAB")


def test_jwk_key_members_decode_to_the_certificate_key(
    doc: dict[str, object], roots: list[x509.Certificate]
) -> None:
    for entry, root in zip(entries(doc), roots, strict=True):
        members = {k: v for k, v in entry.items() if k not in ("use", "x5c")}
        reader = ECAlgorithm if entry["kty"] == "EC" else RSAAlgorithm
        assert reader.from_jwk(json.dumps(members)) == root.public_key()


def test_top_level_members(doc: dict[str, object]) -> None:
    assert set(doc) == {"keys", "spiffe_sequence", "spiffe_refresh_hint"}
    assert doc["spiffe_sequence"] == 7
    assert doc["spiffe_refresh_hint"] == 300  # an integer number of seconds (4.1.2)
    json.dumps(doc)  # plain JSON types only


def test_optional_members_are_left_out(roots: list[x509.Certificate]) -> None:
    assert set(spiffe_bundle(TD, roots)) == {"keys"}


def test_refresh_hint_rounds_up_to_whole_seconds(roots: list[x509.Certificate]) -> None:
    hint = spiffe_bundle(TD, roots, refresh_hint=timedelta(milliseconds=1500))
    assert hint["spiffe_refresh_hint"] == 2


def test_intermediates_may_be_published_too(roots: list[x509.Certificate]) -> None:
    inter = profile.build_intermediate(
        key(KeyAlgorithm.EC_P256, 7),
        roots[0],
        key(KeyAlgorithm.EC_P256, 8).public_key(),
        TD,
        ttl=timedelta(hours=48),
        now=NOW,
    )
    assert parse_spiffe_bundle(spiffe_bundle(TD, [roots[0], inter])) == [roots[0], inter]


def test_leaf_certificates_are_refused(roots: list[x509.Certificate]) -> None:
    inter_key = key(KeyAlgorithm.EC_P256, 8)
    inter = profile.build_intermediate(
        key(KeyAlgorithm.EC_P256, 7),
        roots[0],
        inter_key.public_key(),
        TD,
        ttl=timedelta(hours=48),
        now=NOW,
    )
    leaf = profile.build_svid(
        inter_key,
        inter,
        key(KeyAlgorithm.EC_P256, 9).public_key(),
        TD.workload("default", "w"),
        not_after=NOW + timedelta(hours=1),
        now=NOW,
    )
    with pytest.raises(ValueError, match="not a CA certificate"):
        spiffe_bundle(TD, [leaf])


def test_other_trust_domains_roots_are_refused(roots: list[x509.Certificate]) -> None:
    with pytest.raises(ValueError, match=r"not in trust domain example\.org"):
        spiffe_bundle(TrustDomain("example.org"), roots)


# -- parsing ---------------------------------------------------------------------------


def test_round_trip_through_json_text(
    doc: dict[str, object], roots: list[x509.Certificate]
) -> None:
    assert parse_spiffe_bundle(json.dumps(doc)) == roots
    assert parse_spiffe_bundle(json.dumps(doc).encode()) == roots
    assert parse_spiffe_bundle(doc) == roots


def test_entries_for_other_uses_and_key_types_are_skipped(
    doc: dict[str, object], roots: list[x509.Certificate]
) -> None:
    mixed = copy.deepcopy(doc)
    extra = [
        {"kty": "EC", "use": "jwt-svid", "kid": "k1", "crv": "P-256", "x": "AA", "y": "AA"},
        {"kty": "OKP", "use": "x509-svid", "crv": "Ed25519", "x": "AA", "x5c": ["AA"]},
        {"kty": "EC", "use": "something-new"},
    ]
    entries(mixed).extend(extra)
    assert parse_spiffe_bundle(mixed) == roots


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda e: e.pop("x5c"), "no x5c"),
        (lambda e: e.update(x5c=[]), "no x5c"),
        (lambda e: e.update(x5c=[e["x5c"][0], e["x5c"][0]]), "holds 2 certificates"),
        (lambda e: e.update(kid="abc"), "sets 'kid'"),
        (lambda e: e.update(x="AAAA"), "do not match"),
        (lambda e: e.update(x5c=["not base64!"]), "not a usable base64 DER"),
        (lambda e: e.update(x5c=[base64.b64encode(b"\x30\x03\x02\x01\x00").decode()]), "DER"),
        (lambda e: e.update(x5c=[5]), "not a string"),
    ],
)
def test_strict_parsing_refuses_what_a_publisher_must_not_send(
    doc: dict[str, object], damage: object, match: str
) -> None:
    broken = copy.deepcopy(doc)
    damage(entries(broken)[0])  # type: ignore[operator]
    with pytest.raises(ValueError, match=match):
        parse_spiffe_bundle(broken)


def test_lenient_parsing_follows_the_consumer_rules(
    doc: dict[str, object], roots: list[x509.Certificate]
) -> None:
    relaxed = copy.deepcopy(doc)
    first, second, _ = entries(relaxed)
    first["x5c"] = [*first["x5c"], second["x5c"][0]]  # type: ignore[misc]
    first["kid"] = "ignored"
    second.pop("x5c")
    # X509-SVID 6.2: extra x5c values are ignored, an entry without x5c is skipped.
    assert parse_spiffe_bundle(relaxed, strict=False) == [roots[0], roots[2]]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", "not JSON"),
        ("[]", "must be a JSON object"),
        ("{}", "no 'keys' array"),
        ('{"keys": {}}', "no 'keys' array"),
        ('{"keys": [1]}', "keys\\[0\\] is not a JSON object"),
    ],
)
def test_documents_that_are_not_bundles_are_refused(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_spiffe_bundle(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["keys", "spiffe_sequence", "x"]),
        json_values
        | st.lists(
            st.fixed_dictionaries(
                {
                    "use": st.sampled_from(["x509-svid", "jwt-svid"]),
                    "kty": st.sampled_from(["EC", "RSA"]),
                },
                optional={"x5c": json_values, "kid": json_values, "x": json_values},
            ),
            max_size=3,
        ),
    )
)
def test_any_json_gives_certificates_or_value_error(doc: dict[str, object]) -> None:
    for strict in (True, False):
        try:
            certs = parse_spiffe_bundle(json.dumps(doc), strict=strict)
        except ValueError:
            continue
        assert all(isinstance(c, x509.Certificate) for c in certs)


# -- PEM -------------------------------------------------------------------------------


def test_pem_bundle_round_trips_in_order(roots: list[x509.Certificate]) -> None:
    text = bundle_pem(roots)
    assert text.count("-----BEGIN CERTIFICATE-----") == len(roots)
    assert text.endswith("-----END CERTIFICATE-----\n")
    assert x509.load_pem_x509_certificates(text.encode()) == roots


def test_empty_pem_bundle_is_empty_text() -> None:
    assert bundle_pem([]) == ""
