"""Root rotation: the lifecycle in the store, the authority following it, the admin CLI.

prepare -> activate -> retire, each refused with a reason when it is not safe, each
applied in one locked transaction (on SQLite and PostgreSQL), and the authority's trust
bundle and issuing chain following the store's active root.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from click.testing import CliRunner
from cryptography import x509
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from meshca.authn.base import Attestation, AuthMethod, Peer
from meshca.ca.authority import Authority, IntermediateSettings, IssueRequest
from meshca.ca.policy import IssuancePolicy
from meshca.ca.roots import create_root, open_root_signer, prepare_root
from meshca.cli.main import main
from meshca.config import FileSignerConfig
from meshca.errors import SignerError
from meshca.pki.keys import KeyAlgorithm
from meshca.pki.profile import fingerprint
from meshca.signers.file import FileSigner
from meshca.spiffe import TrustDomain
from meshca.store import NewIssuance, RootRecord, Store
from meshca.store.migrate import alembic_config, head_revision
from meshca.store.root_lifecycle import RootRefusedError
from tests.support import make_csr, verify_with_cryptography, verify_with_openssl

TD = TrustDomain("cluster.local")
WEB = TD.workload("default", "web")
HOUR = timedelta(hours=1)


def _now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'meshca.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    opened = Store.open(database_url)
    yield opened
    opened.close()


def _key(tmp_path: Path, name: str) -> FileSigner:
    return FileSigner.create(tmp_path / f"{name}.pem", KeyAlgorithm.EC_P256)


def _first_and_prepared(
    store: Store, tmp_path: Path, *, prepared_at: datetime | None = None, cross: bool = False
) -> tuple[RootRecord, RootRecord, FileSigner, FileSigner]:
    old_key, new_key = _key(tmp_path, "old"), _key(tmp_path, "new")
    old = create_root(store, old_key, TD, ttl=timedelta(days=30), now=_now() - HOUR * 3)
    new = prepare_root(
        store,
        new_key,
        TD,
        ttl=timedelta(days=60),
        now=prepared_at or _now() - HOUR * 2,
        cross_signer=old_key if cross else None,
    )
    return old, new, old_key, new_key


def _states(store: Store) -> dict[str, str]:
    return {r.fingerprint: r.state for r in store.list_roots()}


def _issue_under(store: Store, root: RootRecord, not_after: datetime) -> None:
    """A ledger row for a leaf issued by an intermediate of ``root``."""
    from meshca.store import IntermediateRecord

    fp = format(abs(hash((root.fingerprint, not_after))), "x").rjust(64, "0")[:64]
    store.add_intermediate(
        IntermediateRecord(
            fingerprint=fp,
            serial_hex="1",
            root_fingerprint=root.fingerprint,
            certificate_pem="PEM",
            not_before=_now() - HOUR,
            not_after=not_after + HOUR,
            owner="test:1",
            created_at=_now() - HOUR,
        )
    )
    store.append_issuance(
        NewIssuance(
            serial_hex="2",
            spiffe_id=str(WEB),
            auth_method="k8s-jwt",
            evidence="test",
            peer_address="127.0.0.1:1",
            not_before=_now() - HOUR,
            not_after=not_after,
            intermediate_fingerprint=fp,
            certificate_pem="PEM",
            issued_at=_now() - HOUR,
        )
    )


# -- the lifecycle in the store -----------------------------------------------------------


def test_prepare_activate_retire(store: Store, tmp_path: Path) -> None:
    old, new, _, _ = _first_and_prepared(store, tmp_path)
    assert _states(store) == {old.fingerprint: "active", new.fingerprint: "prepared"}

    activated, previous, forced = store.activate_root(
        new.fingerprint[:12], now=_now(), propagation=HOUR, force=False
    )
    assert (activated.fingerprint, previous and previous.fingerprint, forced) == (
        new.fingerprint,
        old.fingerprint,
        False,
    )
    assert _states(store) == {old.fingerprint: "retiring", new.fingerprint: "active"}
    assert store.active_root() is not None
    assert store.active_root().fingerprint == new.fingerprint  # type: ignore[union-attr]

    retired, under = store.retire_root(old.fingerprint, now=_now(), force=False)
    assert retired.state == "retired" and under.count == 0
    assert _states(store) == {old.fingerprint: "retired", new.fingerprint: "active"}


def test_operator_mistakes_are_refused_and_change_nothing(store: Store, tmp_path: Path) -> None:
    lone = _key(tmp_path, "lone")
    with pytest.raises(RootRefusedError, match=r"no root is active.*meshca admin root create"):
        prepare_root(store, lone, TD, ttl=timedelta(days=30), now=_now())
    assert store.list_roots() == []

    old, new, _, _ = _first_and_prepared(store, tmp_path, prepared_at=_now())
    before = _states(store)
    mistakes = [
        (
            lambda: prepare_root(store, _key(tmp_path, "third"), TD, ttl=HOUR * 48, now=_now()),
            f"root {new.fingerprint[:16]} is already prepared.*activate.*or drop it",
        ),
        (
            lambda: store.activate_root("00000000", now=_now(), propagation=HOUR, force=False),
            "no root has a fingerprint starting 00000000",
        ),
        (
            lambda: store.activate_root("zz", now=_now(), propagation=HOUR, force=False),
            "not a fingerprint; give at least 8 hex digits",
        ),
        (
            lambda: store.activate_root(old.fingerprint, now=_now(), propagation=HOUR, force=False),
            "is already active; nothing to do",
        ),
        (
            lambda: store.activate_root(new.fingerprint, now=_now(), propagation=HOUR, force=False),
            "needs until .* to reach every agent and proxy.*--force",
        ),
        (
            lambda: store.retire_root(old.fingerprint, now=_now(), force=True),
            "is the active root; prepare and activate its successor first",
        ),
    ]
    for mistake, message in mistakes:
        with pytest.raises(RootRefusedError, match=message):
            mistake()
        assert _states(store) == before
    assert not (tmp_path / "third.pem").exists() or len(store.list_roots()) == 2

    # --force cuts the propagation wait short, and says so.
    _, _, forced = store.activate_root(new.fingerprint, now=_now(), propagation=HOUR, force=True)
    assert forced
    store.retire_root(old.fingerprint, now=_now(), force=False)
    with pytest.raises(RootRefusedError, match="is retired; only a prepared root"):
        store.activate_root(old.fingerprint, now=_now(), propagation=HOUR, force=True)
    with pytest.raises(RootRefusedError, match="already retired"):
        store.retire_root(old.fingerprint, now=_now(), force=True)


def test_retire_waits_for_the_last_certificate_under_the_root(store: Store, tmp_path: Path) -> None:
    old, new, _, _ = _first_and_prepared(store, tmp_path)
    last = _now() + timedelta(minutes=30)
    _issue_under(store, old, _now() + timedelta(minutes=10))
    _issue_under(store, old, last)
    _issue_under(store, old, _now() - timedelta(minutes=5))  # expired: does not count
    store.activate_root(new.fingerprint, now=_now(), propagation=HOUR, force=False)

    with pytest.raises(RootRefusedError) as refused:
        store.retire_root(old.fingerprint, now=_now(), force=False)
    assert f"2 unexpired certificate(s) chain to root {old.fingerprint[:16]}" in str(refused.value)
    assert last.isoformat()[:19] in str(refused.value)
    assert _states(store)[old.fingerprint] == "retiring"

    # After the last one expires it goes through without --force.
    retired, under = store.retire_root(old.fingerprint, now=last + HOUR, force=False)
    assert retired.state == "retired" and under.count == 0


def test_a_prepared_root_can_be_dropped(store: Store, tmp_path: Path) -> None:
    old, new, _, _ = _first_and_prepared(store, tmp_path)
    store.retire_root(new.fingerprint, now=_now(), force=False)
    assert _states(store) == {old.fingerprint: "active", new.fingerprint: "retired"}
    prepare_root(store, _key(tmp_path, "next"), TD, ttl=timedelta(days=30), now=_now())


def test_concurrent_operators_are_serialised(
    store: Store, database_url: str, tmp_path: Path
) -> None:
    """Two operators activating at once: one wins, the other is told it is already active;
    never two active roots."""
    _, new, _, _ = _first_and_prepared(store, tmp_path)
    stores = [Store(database_url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    outcomes: list[str] = []

    def activate(s: Store) -> None:
        barrier.wait()
        try:
            s.activate_root(new.fingerprint, now=_now(), propagation=HOUR, force=False)
            outcomes.append("activated")
        except RootRefusedError as exc:
            outcomes.append(exc.message)

    threads = [threading.Thread(target=activate, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s in stores:
        s.close()
    assert outcomes.count("activated") == 1, outcomes
    assert all("already active" in o for o in outcomes if o != "activated"), outcomes
    assert sorted(_states(store).values()) == ["active", "retiring"]


def test_migration_0004_keeps_roots_and_allows_one_prepared(database_url: str) -> None:
    engine = create_engine(database_url)
    if engine.dialect.name == "sqlite":
        Path(engine.url.database or "").parent.mkdir(parents=True, exist_ok=True)
    now = _now()
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "0003")
            connection.execute(
                text(
                    "INSERT INTO roots (fingerprint, subject, backend, key_ref, algorithm, "
                    "certificate_pem, not_before, not_after, state, created_at) VALUES "
                    "(:fp, 'CN=r', 'file', 'k', 'ec-p256', 'PEM', :nb, :na, 'active', :nb)"
                ),
                {"fp": "a" * 64, "nb": now, "na": now + HOUR},
            )
    finally:
        engine.dispose()
    store = Store.open(database_url)
    try:
        assert store.current_revision() == head_revision()
        (kept,) = store.list_roots()
        assert kept.state == "active" and kept.activated_at is None
        assert kept.cross_certificate_pem is None
    finally:
        store.close()
    engine = create_engine(database_url)
    insert = text(
        "INSERT INTO roots (fingerprint, subject, backend, key_ref, algorithm, "
        "certificate_pem, not_before, not_after, state, created_at) VALUES "
        "(:fp, 'CN=r', 'file', 'k', 'ec-p256', 'PEM', :nb, :na, 'prepared', :nb)"
    )
    try:
        with engine.begin() as connection:
            connection.execute(insert, {"fp": "b" * 64, "nb": now, "na": now + HOUR})
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(insert, {"fp": "c" * 64, "nb": now, "na": now + HOUR})
    finally:
        engine.dispose()


# -- the authority follows the store --------------------------------------------------------


def _authority(store: Store, signer: FileSigner, tmp_path: Path) -> Authority:
    root = store.active_root()
    assert root is not None
    return Authority(
        trust_domain=TD,
        root_signer=signer,
        root=root,
        store=store,
        policy=IssuancePolicy(TD, timedelta(hours=1), timedelta(minutes=10)),
        intermediate=IntermediateSettings(ttl=timedelta(hours=4)),
        root_signers=lambda record: open_root_signer(
            record, FileSignerConfig(), state_dir=tmp_path
        ),
    )


async def _issue(authority: Authority) -> tuple[str, ...]:
    issued = await authority.issue(
        IssueRequest(csr=make_csr(str(WEB))[1]),
        Attestation(spiffe_id=WEB, method=AuthMethod.K8S_JWT),
        Peer("127.0.0.1:1"),
    )
    return issued.chain_pem


def _anchors(authority: Authority) -> set[str]:
    return {fingerprint(c) for c in authority.trust_bundle()}


async def test_authority_publishes_switches_and_drops_roots(store: Store, tmp_path: Path) -> None:
    old_key = _key(tmp_path, "old")
    old = create_root(store, old_key, TD, ttl=timedelta(days=30), now=_now() - HOUR)
    authority = _authority(store, old_key, tmp_path)
    try:
        await authority.refresh_trust_bundle()
        before = await _issue(authority)
        new = prepare_root(store, _key(tmp_path, "new"), TD, ttl=timedelta(days=60), now=_now())

        # prepared: published, not signing
        assert not await authority.refresh_trust_bundle()
        assert _anchors(authority) == {old.fingerprint, new.fingerprint}
        assert fingerprint(authority.root_certificate) == old.fingerprint

        # activated by an operator elsewhere: this process follows at its next refresh
        store.activate_root(new.fingerprint, now=_now(), propagation=HOUR, force=True)
        assert await authority.refresh_trust_bundle()
        after = await _issue(authority)
        assert fingerprint(x509.load_pem_x509_certificate(after[-1].encode())) == new.fingerprint
        verify_with_cryptography(after)
        assert "OK" in verify_with_openssl(after, tmp_path)
        # the old chain is still trusted: both roots are in the bundle while retiring
        assert _anchors(authority) == {old.fingerprint, new.fingerprint}
        assert fingerprint(x509.load_pem_x509_certificate(before[-1].encode())) == old.fingerprint

        store.retire_root(old.fingerprint, now=_now(), force=True)
        await authority.refresh_trust_bundle()
        assert _anchors(authority) == {new.fingerprint}
    finally:
        await authority.close()


async def test_cross_signed_chain_verifies_against_the_old_root_alone(
    store: Store, tmp_path: Path
) -> None:
    old, new, old_key, _ = _first_and_prepared(store, tmp_path, cross=True)
    assert new.cross_certificate_pem is not None
    authority = _authority(store, old_key, tmp_path)
    try:
        store.activate_root(new.fingerprint, now=_now(), propagation=HOUR, force=False)
        await authority.refresh_trust_bundle()
        chain = await _issue(authority)
        # leaf, intermediate, cross-certificate, new root
        assert len(chain) == 4 and chain[2] == new.cross_certificate_pem
        old_only = (*chain[:3], old.certificate_pem)
        verify_with_cryptography(old_only)
        assert "OK" in verify_with_openssl(old_only, tmp_path)
        verify_with_cryptography((*chain[:2], chain[3]))

        # once the old root is retired, the bridge is no longer handed out
        store.retire_root(old.fingerprint, now=_now(), force=True)
        await authority.refresh_trust_bundle()
        await authority._rotate()  # the next intermediate, as at its rotation point
        assert len(await _issue(authority)) == 3
    finally:
        await authority.close()


# -- the admin CLI -------------------------------------------------------------------------


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["admin", "root", *args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_rotation_with_status_at_each_step(tmp_path: Path) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    code, out, err = _cli("create", *state)
    assert code == 0, err
    code, out, err = _cli("prepare", *state, "--ttl", "2y")
    assert code == 0, err
    assert "prepared" in out and "next: `meshca admin root activate" in out
    status = json.loads(_cli("status", *state, "-o", "json")[1])
    old, new = status["roots"]
    assert (old["state"], new["state"]) == ("active", "prepared")
    assert status["next_step"]["command"] == f"meshca admin root activate {new['fingerprint'][:16]}"
    assert status["next_step"]["earliest"] > new["prepared_at"]

    code, out, err = _cli("activate", *state, new["fingerprint"][:16])
    assert code == 1 and "needs until" in err and "--force" in err
    code, out, err = _cli("activate", *state, new["fingerprint"][:16], "--force")
    assert code == 0 and "warning" in err and "is active" in out

    status = json.loads(_cli("status", *state, "-o", "json")[1])
    assert [r["state"] for r in status["roots"]] == ["retiring", "active"]
    assert status["next_step"]["command"].startswith("meshca admin root retire")
    code, out, err = _cli("retire", *state, old["fingerprint"][:16])
    assert code == 0 and "retired" in out
    code, out, err = _cli("status", *state)
    assert "retired" in out and "next: `meshca admin root prepare`" in out


def test_cli_refuses_to_activate_a_root_whose_key_is_gone(tmp_path: Path) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    assert _cli("create", *state)[0] == 0
    new_key = tmp_path / "new-root.pem"
    assert _cli("prepare", *state, "--key-file", str(new_key))[0] == 0
    new = json.loads(_cli("status", *state, "-o", "json")[1])["roots"][1]
    new_key.unlink()
    code, _, err = _cli("activate", *state, new["fingerprint"][:16], "--force")
    assert code == 2 and str(new_key) in err
    assert json.loads(_cli("status", *state, "-o", "json")[1])["roots"][1]["state"] == "prepared"


def test_cli_second_prepare_makes_no_key(tmp_path: Path) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    assert _cli("create", *state)[0] == 0
    assert _cli("prepare", *state)[0] == 0
    keys = sorted(p.name for p in (tmp_path / "state").glob("root-key*.pem"))
    code, _, err = _cli("prepare", *state, "--key-file", str(tmp_path / "third.pem"))
    assert code == 1 and "is already prepared" in err
    assert not (tmp_path / "third.pem").exists()
    assert sorted(p.name for p in (tmp_path / "state").glob("root-key*.pem")) == keys


async def test_a_replica_that_cannot_open_the_new_key_keeps_signing_with_the_old_root(
    store: Store, tmp_path: Path
) -> None:
    """The key of the new root is missing here: this process says so at each refresh,
    keeps its bundle current and goes on issuing under the old root (which the ledger
    then keeps from being retired)."""
    old, new, old_key, _ = _first_and_prepared(store, tmp_path)
    authority = _authority(store, old_key, tmp_path)
    (tmp_path / "new.pem").unlink()
    try:
        store.activate_root(new.fingerprint, now=_now(), propagation=HOUR, force=False)
        with pytest.raises(SignerError, match=str(tmp_path / "new.pem")):
            await authority.refresh_trust_bundle()
        assert _anchors(authority) == {old.fingerprint, new.fingerprint}
        chain = await _issue(authority)
        assert chain[-1] == old.certificate_pem
        with pytest.raises(RootRefusedError, match="1 unexpired certificate"):
            store.retire_root(old.fingerprint, now=_now(), force=False)
    finally:
        await authority.close()
