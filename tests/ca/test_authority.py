"""Authority: intermediate rotation, TTL clamping, root bootstrap (freezegun for time)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from freezegun import freeze_time

from meshca.authn.base import Attestation, AuthMethod, Peer
from meshca.ca.authority import Authority, IntermediateSettings, IssueRequest
from meshca.ca.policy import IssuancePolicy
from meshca.ca.roots import load_active_root
from meshca.errors import ConfigError, PolicyError, SignerError
from meshca.pki.keys import KeyAlgorithm
from meshca.signers.file import FileSigner
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.store import Store
from tests.support import make_csr, verify_with_cryptography

TD = TrustDomain("cluster.local")
WEB = TD.workload("default", "web")
PEER = Peer(address="127.0.0.1:4000")
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(f"sqlite:///{tmp_path / 'meshca.db'}")
    yield opened
    opened.close()


def _authority(store: Store, tmp_path: Path, **policy: timedelta) -> Authority:
    signer, _ = FileSigner.load_or_create(tmp_path / "root-key.pem", KeyAlgorithm.EC_P256)
    root, _ = load_active_root(
        store, signer, TD, now=datetime.now(UTC), create_ttl=timedelta(days=3650)
    )
    return Authority(
        trust_domain=TD,
        root_signer=signer,
        root=root,
        store=store,
        policy=IssuancePolicy(
            TD,
            policy.get("max_ttl", timedelta(hours=24)),
            policy.get("default_ttl", timedelta(hours=1)),
        ),
        intermediate=IntermediateSettings(ttl=timedelta(hours=48), rotate_fraction=0.5),
    )


def _attestation(sid: SpiffeId = WEB) -> Attestation:
    return Attestation(spiffe_id=sid, method=AuthMethod.K8S_JWT, selectors=("k8s:ns:default",))


async def _issue(authority: Authority, ttl: timedelta | None = None) -> x509.Certificate:
    issued = await authority.issue(
        IssueRequest(csr=make_csr(str(WEB))[1], requested_ttl=ttl), _attestation(), PEER
    )
    verify_with_cryptography(issued.chain_pem)
    return issued.certificate


async def test_intermediate_rotates_at_half_life_and_each_is_recorded(
    store: Store, tmp_path: Path
) -> None:
    with freeze_time(START) as clock:
        authority = _authority(store, tmp_path)
        await _issue(authority)
        first = authority.current_issuing_ca
        assert first is not None
        clock.tick(timedelta(hours=23, minutes=59))
        await _issue(authority)
        assert authority.current_issuing_ca == first
        clock.tick(timedelta(minutes=2))
        await authority.rotate_if_due()  # what the maintenance loop does
        leaf = await _issue(authority)
        second = authority.current_issuing_ca
        assert second is not None and second.fingerprint != first.fingerprint
        assert leaf.issuer == second.certificate.subject
        recorded = {i.fingerprint for i in store.list_intermediates()}
        assert {first.fingerprint, second.fingerprint} <= recorded


async def test_leaf_never_outlives_its_intermediate(store: Store, tmp_path: Path) -> None:
    with freeze_time(START):
        authority = _authority(
            store, tmp_path, max_ttl=timedelta(days=30), default_ttl=timedelta(hours=1)
        )
        # The policy would allow 30 days; the 48h intermediate caps it.
        leaf = await _issue(authority, ttl=timedelta(days=30))
        inter = authority.current_issuing_ca
        assert inter is not None
        assert leaf.not_valid_after_utc == inter.not_after


@pytest.mark.parametrize(
    ("requested", "granted"),
    [
        (None, timedelta(hours=1)),
        (timedelta(0), timedelta(hours=1)),
        (timedelta(minutes=5), timedelta(minutes=5)),
        (timedelta(hours=48), timedelta(hours=24)),
    ],
)
async def test_ttl_is_defaulted_and_clamped(
    store: Store, tmp_path: Path, requested: timedelta | None, granted: timedelta
) -> None:
    with freeze_time(START):
        leaf = await _issue(_authority(store, tmp_path), ttl=requested)
        assert leaf.not_valid_after_utc == START + granted


async def test_foreign_trust_domain_is_refused(store: Store, tmp_path: Path) -> None:
    authority = _authority(store, tmp_path)
    other = TrustDomain("evil.example").workload("default", "web")
    with pytest.raises(PolicyError, match=r"not in trust domain cluster\.local"):
        await authority.issue(IssueRequest(csr=make_csr(None)[1]), _attestation(other), PEER)
    assert store.counts().issued == 0


async def test_every_issuance_is_ledgered_with_its_evidence(store: Store, tmp_path: Path) -> None:
    authority = _authority(store, tmp_path)
    issued = await authority.issue(
        IssueRequest(csr=make_csr(str(WEB))[1], request_id="req-1"), _attestation(), PEER
    )
    leaf = issued.certificate
    report = store.verify_ledger()
    assert report.ok and report.rows_checked == 1
    row = store.find_by_request_id("req-1", str(WEB))
    assert row is not None
    assert row.serial_hex == format(leaf.serial_number, "x")
    assert row.spiffe_id == str(WEB)
    assert row.auth_method == "k8s-jwt"
    assert row.evidence == "k8s:ns:default"
    assert row.peer_address == "127.0.0.1:4000"


def test_restart_keeps_the_root_and_refuses_a_foreign_key(store: Store, tmp_path: Path) -> None:
    signer, created = FileSigner.load_or_create(tmp_path / "root-key.pem", KeyAlgorithm.EC_P256)
    now = datetime.now(UTC)
    first, made = load_active_root(store, signer, TD, now=now, create_ttl=timedelta(days=1))
    assert created and made
    again, made_again = load_active_root(
        store, FileSigner.load(tmp_path / "root-key.pem"), TD, now=now, create_ttl=timedelta(days=1)
    )
    assert not made_again and again.fingerprint == first.fingerprint

    other, _ = FileSigner.load_or_create(tmp_path / "other-key.pem", KeyAlgorithm.EC_P256)
    with pytest.raises(ConfigError, match="does not match"):
        load_active_root(store, other, TD, now=now, create_ttl=timedelta(days=1))
    with pytest.raises(ConfigError, match="trust domain of an existing CA cannot change"):
        load_active_root(
            store, signer, TrustDomain("other.example"), now=now, create_ttl=timedelta(days=1)
        )
    with pytest.raises(ConfigError, match="expired"):
        load_active_root(store, signer, TD, now=now + timedelta(days=2), create_ttl=None)


def test_hardware_backends_never_create_a_root_at_start(store: Store, tmp_path: Path) -> None:
    signer, _ = FileSigner.load_or_create(tmp_path / "root-key.pem", KeyAlgorithm.EC_P256)
    with pytest.raises(ConfigError, match="meshca admin root create"):
        load_active_root(store, signer, TD, now=datetime.now(UTC), create_ttl=None)


class FlakyRoot:
    """A root signer that can be switched off, like an HSM or KMS outage."""

    def __init__(self, inner: FileSigner) -> None:
        self.inner = inner
        self.down = False
        self.backend, self.key_id, self.algorithm = "file", inner.key_id, inner.algorithm
        self.calls = 0

    def public_key(self):  # type: ignore[no-untyped-def]
        return self.inner.public_key()

    def sign(self, data: bytes) -> bytes:
        self.calls += 1
        if self.down:
            raise SignerError("the HSM is unreachable", reason="signer_unavailable")
        return self.inner.sign(data)


async def test_root_outage_at_rotation_does_not_stop_issuance(store: Store, tmp_path: Path) -> None:
    """Past the rotation point with the root signer down, the current intermediate keeps
    signing; the failed rotation is retried with backoff, and succeeds once it is back."""
    signer, _ = FileSigner.load_or_create(tmp_path / "root-key.pem", KeyAlgorithm.EC_P256)
    root, _ = load_active_root(store, signer, TD, now=START, create_ttl=timedelta(days=3650))
    flaky = FlakyRoot(signer)
    with freeze_time(START) as clock:
        authority = Authority(
            trust_domain=TD,
            root_signer=flaky,
            root=root,
            store=store,  # type: ignore[arg-type]
            policy=IssuancePolicy(TD, timedelta(hours=24), timedelta(hours=1)),
            intermediate=IntermediateSettings(ttl=timedelta(hours=48), rotate_fraction=0.5),
        )
        await _issue(authority)
        first = authority.current_issuing_ca
        assert first is not None
        flaky.down = True
        clock.tick(timedelta(hours=25))
        for _ in range(20):  # every request still gets a certificate from the current one
            leaf = await _issue(authority)
            assert leaf.issuer == first.certificate.subject
        await asyncio.sleep(0)  # let the background attempt run and fail
        with pytest.raises(SignerError):
            await authority.rotate_if_due()
        attempts = flaky.calls
        for _ in range(20):  # backing off: no new attempt on every request
            await _issue(authority)
        assert flaky.calls == attempts
        flaky.down = False
        await authority.rotate_if_due()
        second = authority.current_issuing_ca
        assert second is not None and second.fingerprint != first.fingerprint
        assert (await _issue(authority)).issuer == second.certificate.subject
        await authority.close()


async def test_concurrent_retries_of_one_request_log_no_error(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The request_id race is ordinary (a client retrying on a timeout): the loser gets
    the winner's certificate, and the operator sees no ERROR for it."""
    authority = _authority(store, tmp_path)
    await authority.issuing_ca()
    request = IssueRequest(csr=make_csr(str(WEB))[1], request_id="req-race")
    caplog.set_level("INFO")
    answers = await asyncio.gather(
        *(authority.issue(request, _attestation(), PEER) for _ in range(4))
    )
    assert {a.ledger_sequence for a in answers} == {answers[0].ledger_sequence}
    assert store.counts().issued == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    raced = [r.getMessage() for r in caplog.records if "concurrent retry" in r.getMessage()]
    assert len(raced) == 3
