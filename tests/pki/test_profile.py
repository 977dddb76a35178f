"""The certificate profile, asserted on real certificates and checked by two verifiers.

Every property listed in meshca.pki.profile's docstring is read back from certificates
built by meshca.pki.profile; chains are verified by cryptography's verifier and by
``openssl verify -x509_strict``, independent implementations of RFC 5280 path validation.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    DNSName,
    IPAddress,
    PolicyBuilder,
    Store,
    VerificationError,
)

from meshca.pki import profile
from meshca.pki.keys import KeyAlgorithm, PrivateKey
from meshca.spiffe import SpiffeId, TrustDomain
from tests.pki.helpers import MemorySigner, key, needs_openssl, openssl_verify

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
TD = TrustDomain("cluster.local")
WORKLOAD = TD.workload("default", "workload")
ROOT_TTL = timedelta(days=365)
INTER_TTL = timedelta(hours=48)
LEAF_TTL = timedelta(hours=1)

P256, P384 = KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P384
RSA2048, RSA3072, RSA4096 = KeyAlgorithm.RSA_2048, KeyAlgorithm.RSA_3072, KeyAlgorithm.RSA_4096


@dataclass(frozen=True)
class Chain:
    root: x509.Certificate
    root_key: PrivateKey
    inter: x509.Certificate
    inter_key: PrivateKey
    leaf: x509.Certificate
    leaf_key: PrivateKey


def make_chain(
    root_alg: KeyAlgorithm = P256,
    inter_alg: KeyAlgorithm = P256,
    leaf_alg: KeyAlgorithm = P256,
    *,
    name_constraints: bool = False,
    spiffe_id: SpiffeId = WORKLOAD,
) -> Chain:
    root_key, inter_key, leaf_key = key(root_alg, 0), key(inter_alg, 1), key(leaf_alg, 2)
    root = profile.build_root(MemorySigner(root_key), TD, ttl=ROOT_TTL, now=NOW)
    inter = profile.build_intermediate(
        MemorySigner(root_key),
        root,
        inter_key.public_key(),
        TD,
        ttl=INTER_TTL,
        now=NOW,
        name_constraints=name_constraints,
    )
    leaf = profile.build_svid(
        inter_key, inter, leaf_key.public_key(), spiffe_id, not_after=NOW + LEAF_TTL, now=NOW
    )
    return Chain(root, root_key, inter, inter_key, leaf, leaf_key)


@pytest.fixture(scope="module")
def chain() -> Chain:
    return make_chain()


def ext(
    cert: x509.Certificate, kind: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


def ski(cert: x509.Certificate) -> bytes:
    value = ext(cert, x509.SubjectKeyIdentifier).value
    assert isinstance(value, x509.SubjectKeyIdentifier)
    return value.digest


def aki(cert: x509.Certificate) -> bytes | None:
    value = ext(cert, x509.AuthorityKeyIdentifier).value
    assert isinstance(value, x509.AuthorityKeyIdentifier)
    return value.key_identifier


def key_usage(cert: x509.Certificate) -> set[str]:
    value = ext(cert, x509.KeyUsage).value
    assert isinstance(value, x509.KeyUsage)
    names = [
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
    ]
    return {name for name in names if getattr(value, name)}


def verify_client(chain: Chain) -> x509.verification.VerifiedClient:
    verifier = PolicyBuilder().store(Store([chain.root])).time(NOW).build_client_verifier()
    return verifier.verify(chain.leaf, [chain.inter])


# -- every certificate -----------------------------------------------------------------


@pytest.mark.parametrize("which", ["root", "inter", "leaf"])
def test_every_cert_has_critical_key_usage_ski_and_aki(chain: Chain, which: str) -> None:
    cert: x509.Certificate = getattr(chain, which)
    assert ext(cert, x509.KeyUsage).critical
    assert ski(cert) == x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest  # type: ignore[arg-type]
    issuer = chain.root if which in ("root", "inter") else chain.inter
    assert aki(cert) == ski(issuer)
    assert cert.version is x509.Version.v3


@pytest.mark.parametrize("which", ["root", "inter", "leaf"])
def test_every_cert_has_a_positive_serial_within_20_octets(chain: Chain, which: str) -> None:
    serial = getattr(chain, which).serial_number
    assert 0 < serial < 2**159


def test_serials_are_random_across_all_159_bits() -> None:
    serials = [profile.new_serial() for _ in range(1000)]
    assert len(set(serials)) == len(serials)
    assert all(0 < s < 2**159 for s in serials)
    union, intersection = 0, 2**159 - 1
    for s in serials:
        union |= s
        intersection &= s
    # Each of the 159 bits is both set and clear somewhere: no fixed bits, no short values.
    assert union == 2**159 - 1
    assert intersection == 0


def test_two_certificates_for_the_same_request_have_different_serials() -> None:
    a, b = make_chain(), make_chain()
    assert a.leaf.serial_number != b.leaf.serial_number
    assert a.root.serial_number != b.root.serial_number


def test_not_before_is_backdated_for_clock_skew(chain: Chain) -> None:
    assert profile.CLOCK_SKEW == timedelta(minutes=5)
    for cert in (chain.root, chain.inter, chain.leaf):
        assert cert.not_valid_before_utc == NOW - profile.CLOCK_SKEW


def test_signature_hash_follows_the_issuer_key() -> None:
    c = make_chain(P384, RSA2048, P256)
    assert isinstance(c.root.signature_hash_algorithm, hashes.SHA384)
    assert isinstance(c.inter.signature_hash_algorithm, hashes.SHA384)  # signed by P-384 root
    assert isinstance(c.leaf.signature_hash_algorithm, hashes.SHA256)  # signed by RSA inter
    assert c.leaf.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSA_WITH_SHA256


# -- root ------------------------------------------------------------------------------


def test_root_is_a_self_signed_ca_for_the_trust_domain(chain: Chain) -> None:
    root = chain.root
    bc = ext(root, x509.BasicConstraints)
    assert bc.critical
    assert bc.value == x509.BasicConstraints(ca=True, path_length=None)
    assert key_usage(root) == {"key_cert_sign", "crl_sign"}
    assert profile.uri_sans(root) == ["spiffe://cluster.local"]
    assert not ext(root, x509.SubjectAlternativeName).critical
    assert root.issuer == root.subject
    assert (
        root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "cluster.local"
    )
    cn = str(root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    assert cn == f"meshca root CA {format(root.serial_number, 'x')[:8]}"
    assert root.not_valid_after_utc == NOW + ROOT_TTL
    root.verify_directly_issued_by(root)


def test_root_signed_through_a_signer_equals_key_signed(chain: Chain) -> None:
    direct = profile.build_root(chain.root_key, TD, ttl=ROOT_TTL, now=NOW)
    direct.verify_directly_issued_by(direct)
    assert direct.public_key() == chain.root.public_key()
    assert ski(direct) == ski(chain.root)
    assert direct.subject != chain.root.subject  # each root's CN names its serial


# -- intermediate ----------------------------------------------------------------------


def test_intermediate_is_a_path_length_zero_ca(chain: Chain) -> None:
    inter = chain.inter
    bc = ext(inter, x509.BasicConstraints)
    assert bc.critical
    assert bc.value == x509.BasicConstraints(ca=True, path_length=0)
    assert key_usage(inter) == {"key_cert_sign", "crl_sign"}
    assert profile.uri_sans(inter) == ["spiffe://cluster.local"]
    assert inter.issuer == chain.root.subject
    assert inter.subject != chain.root.subject
    cn = str(inter.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    assert cn == f"meshca issuing CA {format(inter.serial_number, 'x')[:8]}"
    assert inter.not_valid_after_utc == NOW + INTER_TTL
    with pytest.raises(x509.ExtensionNotFound):
        ext(inter, x509.NameConstraints)
    inter.verify_directly_issued_by(chain.root)


def test_intermediate_never_outlives_the_root(chain: Chain) -> None:
    late = NOW + ROOT_TTL - timedelta(hours=1)
    inter = profile.build_intermediate(
        chain.root_key, chain.root, key(P256, 1).public_key(), TD, ttl=INTER_TTL, now=late
    )
    assert inter.not_valid_after_utc == chain.root.not_valid_after_utc


def test_intermediate_never_starts_before_the_root(chain: Chain) -> None:
    # This replica's clock is a minute behind the one that made the root.
    inter = profile.build_intermediate(
        chain.root_key,
        chain.root,
        key(P256, 1).public_key(),
        TD,
        ttl=INTER_TTL,
        now=NOW - timedelta(minutes=1),
    )
    assert inter.not_valid_before_utc == chain.root.not_valid_before_utc


def test_intermediate_path_length_is_enforced_at_build_time(chain: Chain) -> None:
    with pytest.raises(ValueError, match="path length 0"):
        profile.build_intermediate(
            chain.inter_key, chain.inter, key(P256, 3).public_key(), TD, ttl=INTER_TTL, now=NOW
        )


def test_intermediate_with_a_longer_path_can_sign_another_ca(chain: Chain) -> None:
    mid = profile.build_intermediate(
        chain.root_key,
        chain.root,
        key(P256, 3).public_key(),
        TD,
        ttl=INTER_TTL,
        now=NOW,
        path_length=1,
    )
    assert ext(mid, x509.BasicConstraints).value == x509.BasicConstraints(ca=True, path_length=1)
    low = profile.build_intermediate(
        key(P256, 3), mid, key(P256, 1).public_key(), TD, ttl=INTER_TTL, now=NOW
    )
    low.verify_directly_issued_by(mid)


# -- leaf (X509-SVID) ------------------------------------------------------------------


def test_leaf_is_an_x509_svid(chain: Chain) -> None:
    leaf = chain.leaf
    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.critical  # the subject is empty (RFC 5280 4.1.2.6)
    assert isinstance(san.value, x509.SubjectAlternativeName)
    assert list(san.value) == [x509.UniformResourceIdentifier(str(WORKLOAD))]
    assert len(leaf.subject) == 0
    assert key_usage(leaf) == {"digital_signature"}
    eku = ext(leaf, x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]  # type: ignore[call-overload]
    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical
    assert bc.value == x509.BasicConstraints(ca=False, path_length=None)
    assert leaf.not_valid_after_utc == NOW + LEAF_TTL
    assert leaf.issuer == chain.inter.subject
    leaf.verify_directly_issued_by(chain.inter)


@pytest.mark.parametrize("alg", [RSA2048, RSA3072])
def test_rsa_leaf_adds_key_encipherment_only(alg: KeyAlgorithm) -> None:
    c = make_chain(leaf_alg=alg)
    assert key_usage(c.leaf) == {"digital_signature", "key_encipherment"}


def test_leaf_not_after_is_capped_by_the_issuer(chain: Chain) -> None:
    leaf = profile.build_svid(
        chain.inter_key,
        chain.inter,
        key(P256, 2).public_key(),
        WORKLOAD,
        not_after=NOW + timedelta(days=30),
        now=NOW,
    )
    assert leaf.not_valid_after_utc == chain.inter.not_valid_after_utc


def test_leaf_for_the_cas_own_server_names_its_hosts(chain: Chain, tmp_path: Path) -> None:
    server_id = SpiffeId.parse("spiffe://cluster.local/meshca/server")
    leaf = profile.build_svid(
        chain.inter_key,
        chain.inter,
        key(P256, 2).public_key(),
        server_id,
        not_after=NOW + LEAF_TTL,
        now=NOW,
        dns_names=["meshca.istio-system.svc", "localhost", "127.0.0.1"],
    )
    san = ext(leaf, x509.SubjectAlternativeName)
    assert not san.critical
    assert isinstance(san.value, x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(server_id)]
    assert san.value.get_values_for_type(x509.DNSName) == ["meshca.istio-system.svc", "localhost"]
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert leaf.subject.rfc4514_string() == "CN=meshca.istio-system.svc"
    store = Store([chain.root])
    for subject in (DNSName("localhost"), IPAddress(ipaddress.ip_address("127.0.0.1"))):
        verifier = PolicyBuilder().store(store).time(NOW).build_server_verifier(subject)
        verifier.verify(leaf, [chain.inter])


@pytest.mark.parametrize(
    ("spiffe_id", "match"),
    [
        (TD.id, "needs a SPIFFE ID with a path"),
        (SpiffeId.parse("spiffe://other.example/ns/default/sa/workload"), "outside the issuer"),
    ],
)
def test_leaf_refuses_ids_the_profile_forbids(
    chain: Chain, spiffe_id: SpiffeId, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        profile.build_svid(
            chain.inter_key,
            chain.inter,
            key(P256, 2).public_key(),
            spiffe_id,
            not_after=NOW + LEAF_TTL,
            now=NOW,
        )


def test_leaf_refuses_a_weak_subject_key(chain: Chain) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="RSA-1024"):
        profile.build_svid(
            chain.inter_key,
            chain.inter,
            weak.public_key(),
            WORKLOAD,
            not_after=NOW + LEAF_TTL,
            now=NOW,
        )


def test_builders_refuse_a_key_that_is_not_the_issuers(chain: Chain) -> None:
    with pytest.raises(ValueError, match="does not match the issuer certificate"):
        profile.build_svid(
            chain.root_key,
            chain.inter,
            key(P256, 2).public_key(),
            WORKLOAD,
            not_after=NOW + LEAF_TTL,
            now=NOW,
        )


def test_builders_refuse_a_leaf_as_issuer(chain: Chain) -> None:
    with pytest.raises(ValueError, match="not a CA"):
        profile.build_svid(
            chain.leaf_key,
            chain.leaf,
            key(P384, 2).public_key(),
            WORKLOAD,
            not_after=NOW + LEAF_TTL,
            now=NOW,
        )


def test_builders_refuse_an_expired_issuer(chain: Chain) -> None:
    later = chain.inter.not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(ValueError, match="no validity left"):
        profile.build_svid(
            chain.inter_key,
            chain.inter,
            key(P256, 2).public_key(),
            WORKLOAD,
            not_after=later + LEAF_TTL,
            now=later,
        )


def test_builders_refuse_naive_datetimes(chain: Chain) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        profile.build_root(chain.root_key, TD, ttl=ROOT_TTL, now=datetime(2025, 6, 1))


# -- verification by independent implementations ---------------------------------------

ALGORITHM_CHAINS = [
    (P256, P256, P256),
    (P384, P384, P384),
    (P384, P256, RSA2048),
    (RSA2048, P256, P256),
    (RSA4096, RSA3072, P384),
    (RSA3072, RSA2048, RSA3072),
]


@pytest.mark.parametrize(("root_alg", "inter_alg", "leaf_alg"), ALGORITHM_CHAINS)
def test_chain_verifies_with_cryptography(
    root_alg: KeyAlgorithm, inter_alg: KeyAlgorithm, leaf_alg: KeyAlgorithm
) -> None:
    c = make_chain(root_alg, inter_alg, leaf_alg)
    verified = verify_client(c)
    assert verified.chain == [c.leaf, c.inter, c.root]
    assert verified.subjects == [x509.UniformResourceIdentifier(str(WORKLOAD))]


@needs_openssl
@pytest.mark.parametrize(("root_alg", "inter_alg", "leaf_alg"), ALGORITHM_CHAINS)
@pytest.mark.parametrize("purpose", ["sslclient", "sslserver"])
def test_chain_verifies_with_openssl(
    tmp_path: Path,
    root_alg: KeyAlgorithm,
    inter_alg: KeyAlgorithm,
    leaf_alg: KeyAlgorithm,
    purpose: str,
) -> None:
    c = make_chain(root_alg, inter_alg, leaf_alg)
    result = openssl_verify(tmp_path, c.root, c.leaf, [c.inter], at=NOW, purpose=purpose)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


@needs_openssl
def test_root_self_signature_checks_with_openssl(chain: Chain, tmp_path: Path) -> None:
    result = openssl_verify(
        tmp_path, chain.root, chain.root, at=NOW, purpose=None, extra=["-check_ss_sig"]
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_openssl
def test_openssl_refuses_the_leaf_after_it_expires(chain: Chain, tmp_path: Path) -> None:
    result = openssl_verify(
        tmp_path, chain.root, chain.leaf, [chain.inter], at=NOW + LEAF_TTL + timedelta(minutes=1)
    )
    assert result.returncode != 0
    assert "expired" in result.stdout + result.stderr


def test_cryptography_refuses_a_leaf_used_as_issuer(chain: Chain) -> None:
    rogue = _leaf_signed_by(chain.leaf_key, chain.leaf, WORKLOAD)
    verifier = PolicyBuilder().store(Store([chain.root])).time(NOW).build_client_verifier()
    with pytest.raises(VerificationError):
        verifier.verify(rogue, [chain.leaf, chain.inter])


# -- name constraints ------------------------------------------------------------------


def _leaf_signed_by(
    issuer_key: PrivateKey, issuer: x509.Certificate, spiffe_id: SpiffeId
) -> x509.Certificate:
    """What a leaked intermediate could mint: a well-formed SVID for any identity.

    Built with cryptography directly, because meshca's own builder refuses identities
    outside the issuer's trust domain.
    """
    subject_key = key(P256, 2)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.subject)
        .public_key(subject_key.public_key())
        .serial_number(profile.new_serial())
        .not_valid_before(NOW - timedelta(minutes=1))
        .not_valid_after(NOW + LEAF_TTL)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ext(issuer, x509.SubjectKeyIdentifier).value  # type: ignore[arg-type]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=True,
        )
        .sign(issuer_key, KeyAlgorithm.of(issuer_key).hash_algorithm())
    )


@pytest.fixture(scope="module")
def constrained() -> Chain:
    return make_chain(name_constraints=True)


def test_name_constraints_permit_only_the_trust_domain(constrained: Chain) -> None:
    nc = ext(constrained.inter, x509.NameConstraints)
    assert nc.critical  # RFC 5280 4.2.1.10
    assert nc.value == x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier("cluster.local")], excluded_subtrees=None
    )


@needs_openssl
def test_openssl_accepts_a_leaf_inside_the_name_constraints(
    constrained: Chain, tmp_path: Path
) -> None:
    result = openssl_verify(
        tmp_path, constrained.root, constrained.leaf, [constrained.inter], at=NOW
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_openssl
@pytest.mark.parametrize(
    "outside",
    [
        "spiffe://evil.example/ns/default/sa/workload",
        "spiffe://sub.cluster.local/ns/default/sa/workload",  # a host constraint, not a domain
    ],
)
def test_openssl_refuses_a_leaf_outside_the_name_constraints(
    constrained: Chain, tmp_path: Path, outside: str
) -> None:
    rogue = _leaf_signed_by(constrained.inter_key, constrained.inter, SpiffeId.parse(outside))
    result = openssl_verify(tmp_path, constrained.root, rogue, [constrained.inter], at=NOW)
    assert result.returncode != 0
    assert "permitted subtree violation" in result.stdout + result.stderr
    # Without the constraint, the same rogue leaf would pass: the constraint is what stops it.
    plain = make_chain()
    unconstrained = _leaf_signed_by(plain.inter_key, plain.inter, SpiffeId.parse(outside))
    assert (
        openssl_verify(tmp_path, plain.root, unconstrained, [plain.inter], at=NOW).returncode == 0
    )


def test_cryptography_verifier_does_not_support_uri_name_constraints(constrained: Chain) -> None:
    """Why name constraints are off by default (X509-SVID 4.2): some verifiers reject them.

    If this starts failing, cryptography has learnt URI constraints; revisit the default.
    """
    with pytest.raises(VerificationError, match="unsupported name constraint"):
        verify_client(constrained)


# -- helpers ---------------------------------------------------------------------------


def test_fingerprint_is_sha256_of_der(chain: Chain) -> None:
    der = chain.leaf.public_bytes(serialization.Encoding.DER)
    assert profile.fingerprint(chain.leaf) == hashlib.sha256(der).hexdigest()


def test_describe_summarises_a_certificate(chain: Chain) -> None:
    summary = profile.describe(chain.inter)
    assert summary["ca"] == "true"
    assert summary["uri_sans"] == "spiffe://cluster.local"
    assert summary["serial"] == format(chain.inter.serial_number, "x")
    assert summary["sha256"] == profile.fingerprint(chain.inter)
    assert summary["issuer"] == chain.root.subject.rfc4514_string()
    assert profile.describe(chain.leaf)["ca"] == "false"
