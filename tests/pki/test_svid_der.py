"""The DER template of X509-SVIDs (meshca.pki.svid_der) against cryptography's builder:
byte for byte over random identities, keys, serials and lifetimes; and every template
certificate accepted by pkilint's RFC 5280 checks and by ``openssl verify``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pkilint import loader
from pkilint.pkix import certificate, extension, name
from pkilint.validation import ValidationFindingSeverity

from meshca.pki import profile, svid_der
from meshca.pki.keys import KeyAlgorithm, PrivateKey
from meshca.spiffe import SpiffeId, TrustDomain
from tests.pki.helpers import MemorySigner, key, needs_openssl, openssl_verify

TD = TrustDomain.parse("cluster.local")
START = datetime(2026, 1, 1, tzinfo=UTC)
ISSUER_ALGORITHMS = (KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P384, KeyAlgorithm.RSA_2048)
SUBJECT_ALGORITHMS = tuple(KeyAlgorithm)
SEGMENT = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_", min_size=1
).filter(lambda s: s not in (".", ".."))


def _chain(algorithm: KeyAlgorithm, *, years: int = 100) -> tuple[PrivateKey, x509.Certificate]:
    """A root and an intermediate (key of ``algorithm``) valid from 2026 for ``years``."""
    root_key = key(KeyAlgorithm.EC_P256, 0)
    root = profile.build_root(root_key, TD, ttl=timedelta(days=365 * years), now=START)
    issuing_key = key(algorithm, 1)
    intermediate = profile.build_intermediate(
        root_key, root, issuing_key.public_key(), TD, ttl=timedelta(days=365 * years), now=START
    )
    return issuing_key, intermediate


def _issuers() -> dict[KeyAlgorithm, profile.PreparedIssuer]:
    issuers = {}
    for algorithm in ISSUER_ALGORITHMS:
        issuing_key, intermediate = _chain(algorithm)
        issuers[algorithm] = profile.PreparedIssuer.prepare(issuing_key, intermediate)
    return issuers


ISSUERS = _issuers()


def test_every_issuer_gets_a_template() -> None:
    assert all(issuer.template is not None for issuer in ISSUERS.values())


def test_a_signer_backed_issuer_gets_one_too() -> None:
    issuing_key, intermediate = _chain(KeyAlgorithm.EC_P256)
    prepared = profile.PreparedIssuer.prepare(MemorySigner(issuing_key), intermediate)
    assert prepared.template is not None
    leaf = profile.build_svid(
        prepared,
        intermediate,
        key(KeyAlgorithm.EC_P256, 2).public_key(),
        SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b"),
        not_after=START + timedelta(hours=1),
        now=START,
    )
    leaf.verify_directly_issued_by(intermediate)


@settings(
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    issuer_algorithm=st.sampled_from(ISSUER_ALGORITHMS),
    subject_algorithm=st.sampled_from(SUBJECT_ALGORITHMS),
    subject_slot=st.integers(2, 4),
    path=st.lists(SEGMENT.map(lambda s: s[:300]), min_size=1, max_size=12),
    serial=st.one_of(
        st.integers(1, 2**159 - 1),
        st.integers(1, 255),
        st.integers(0, 158).map(lambda bits: 2**bits),
        st.integers(0, 159).map(lambda bits: 2**bits - 1).filter(bool),
    ),
    start=st.datetimes(
        min_value=datetime(2026, 1, 1),
        max_value=datetime(2120, 1, 1),
        timezones=st.just(UTC),
    ),
    lifetime=st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=3650)),
)
def test_the_template_encodes_what_the_builder_encodes(
    issuer_algorithm: KeyAlgorithm,
    subject_algorithm: KeyAlgorithm,
    subject_slot: int,
    path: list[str],
    serial: int,
    start: datetime,
    lifetime: timedelta,
) -> None:
    issuer = ISSUERS[issuer_algorithm]
    template = issuer.template
    assert template is not None
    public_key = key(subject_algorithm, subject_slot).public_key()
    spiffe_id = SpiffeId.parse("spiffe://cluster.local/" + "/".join(path))
    not_before = start.replace(microsecond=0)
    not_after = (start + lifetime).replace(microsecond=0)
    expected = profile._build_svid(issuer, public_key, spiffe_id, serial, not_before, not_after)
    tbs = template.tbs(public_key, str(spiffe_id), serial, not_before, not_after)
    assert tbs == expected.tbs_certificate_bytes
    der = template.sign(tbs)
    if issuer_algorithm.is_ec:  # ECDSA signatures are randomised: all but the signature
        cert = x509.load_der_x509_certificate(der)
        assert cert.tbs_certificate_bytes == tbs
        assert cert.signature_algorithm_oid == expected.signature_algorithm_oid
        cert.verify_directly_issued_by(issuer.certificate)
    else:  # PKCS#1 v1.5 is deterministic: the whole certificate
        assert der == expected.public_bytes(serialization.Encoding.DER)


def _findings(cert: x509.Certificate) -> set[tuple[str, str]]:
    validator = certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(
            name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
        ),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    )
    document = loader.RFC5280CertificateDocumentLoader().load_der_document(
        cert.public_bytes(serialization.Encoding.DER), "leaf"
    )
    found = set()
    for result in validator.validate(document.root):
        for description in result.finding_descriptions:
            finding = description.finding
            if finding.severity != ValidationFindingSeverity.INFO:
                found.add((str(finding.severity), finding.code))
    return found


# pkilint checks URIs with the validators package, which knows http(s), ftp and a few
# other schemes but not spiffe: it reports every SPIFFE ID as bad URI syntax, the
# builder's certificates too.
PKILINT_SPIFFE_URI = {("ERROR", "pkix.invalid_uri_syntax")}


@pytest.mark.parametrize("issuer_algorithm", ISSUER_ALGORITHMS)
@pytest.mark.parametrize("subject_algorithm", SUBJECT_ALGORITHMS)
def test_pkilint_finds_nothing_the_builder_does_not_have(
    issuer_algorithm: KeyAlgorithm, subject_algorithm: KeyAlgorithm
) -> None:
    issuer = ISSUERS[issuer_algorithm]
    public_key = key(subject_algorithm, 2).public_key()
    spiffe_id = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/web")
    leaf = profile.build_svid(
        issuer,
        issuer.certificate,
        public_key,
        spiffe_id,
        not_after=START + timedelta(hours=1),
        now=START,
    )
    reference = profile._build_svid(
        issuer,
        public_key,
        spiffe_id,
        leaf.serial_number,
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
    )
    assert _findings(leaf) == _findings(reference) == PKILINT_SPIFFE_URI


@needs_openssl
@pytest.mark.parametrize("issuer_algorithm", ISSUER_ALGORITHMS)
@pytest.mark.parametrize(
    "subject_algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P384, KeyAlgorithm.RSA_2048]
)
@pytest.mark.parametrize("years", [1, 30])  # UTCTime, then GeneralizedTime (2050 on)
def test_openssl_verifies_template_certificates(
    tmp_path: Path, issuer_algorithm: KeyAlgorithm, subject_algorithm: KeyAlgorithm, years: int
) -> None:
    root_key = key(KeyAlgorithm.EC_P256, 0)
    root = profile.build_root(root_key, TD, ttl=timedelta(days=365 * 40), now=START)
    issuing_key = key(issuer_algorithm, 1)
    intermediate = profile.build_intermediate(
        root_key, root, issuing_key.public_key(), TD, ttl=timedelta(days=365 * 40), now=START
    )
    issuer = profile.PreparedIssuer.prepare(issuing_key, intermediate)
    assert issuer.template is not None
    now = START + timedelta(days=365 * years)
    leaf = profile.build_svid(
        issuer,
        intermediate,
        key(subject_algorithm, 2).public_key(),
        SpiffeId.parse("spiffe://cluster.local/ns/default/sa/" + "x" * 200),
        not_after=now + timedelta(hours=1),
        now=now,
    )
    for purpose in ("sslclient", "sslserver"):
        result = openssl_verify(
            tmp_path, root, leaf, [intermediate], at=now + timedelta(minutes=1), purpose=purpose
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_a_template_that_disagrees_with_the_builder_is_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    issuing_key, intermediate = _chain(KeyAlgorithm.EC_P256)
    real = svid_der.SvidTemplate.tbs

    def off_by_one(self: svid_der.SvidTemplate, *args: object, **kwargs: object) -> bytes:
        der = real(self, *args, **kwargs)  # type: ignore[arg-type]
        return der[:-1] + bytes([der[-1] ^ 1])

    monkeypatch.setattr(svid_der.SvidTemplate, "tbs", off_by_one)
    prepared = profile.PreparedIssuer.prepare(issuing_key, intermediate)
    assert prepared.template is None
    leaf = profile.build_svid(
        prepared,
        intermediate,
        key(KeyAlgorithm.EC_P256, 2).public_key(),
        SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b"),
        not_after=START + timedelta(hours=1),
        now=START,
    )
    leaf.verify_directly_issued_by(intermediate)  # the builder made it


def test_dns_names_go_to_the_builder() -> None:
    issuer = ISSUERS[KeyAlgorithm.EC_P256]
    leaf = profile.build_svid(
        issuer,
        issuer.certificate,
        key(KeyAlgorithm.EC_P256, 2).public_key(),
        SpiffeId.parse("spiffe://cluster.local/meshca/server"),
        not_after=START + timedelta(hours=1),
        now=START,
        dns_names=["meshca.example"],
    )
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["meshca.example"]
