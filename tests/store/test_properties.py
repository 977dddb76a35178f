"""Property: after any run of appends, any single tamper is named by verification."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text, update
from sqlmodel import Session, SQLModel

from meshca.store import LedgerEntry, NewIssuance, Store, row_hash

from .helpers import T0, reset_ledger, tamper

LEDGER = SQLModel.metadata.tables["ledger"]
TEXT_FIELDS = ("serial_hex", "spiffe_id", "evidence", "peer_address", "certificate_pem")
TIME_FIELDS = ("not_before", "not_after", "issued_at")
KINDS = ("edit", "delete", "swap", "truncate", "rehash")

# Text the CA might be handed: any Unicode but NUL (PostgreSQL text cannot hold it).
safe_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12
)


@st.composite
def issuances(draw: st.DrawFn) -> NewIssuance:
    at = T0 + timedelta(microseconds=draw(st.integers(0, 10**12)))
    return NewIssuance(
        serial_hex=draw(st.text("0123456789abcdef", min_size=1, max_size=40)),
        spiffe_id="spiffe://cluster.local/" + draw(safe_text),
        auth_method=draw(st.sampled_from(["k8s-jwt", "gce-iit", "x509-svid"])),
        evidence=draw(safe_text),
        peer_address=draw(safe_text),
        not_before=at,
        not_after=at + timedelta(seconds=draw(st.integers(1, 86400))),
        intermediate_fingerprint="ef" * 32,
        certificate_pem=draw(safe_text),
        issued_at=at,
        request_id=draw(st.none() | st.uuids().map(str)),
        csr_sha256=draw(st.none() | st.just("12" * 32)),
    )


def apply_tamper(
    database_url: str, kind: str, target: int, other: int, field: str, n: int
) -> set[int]:
    """Damage the ledger; return the sequences verification must name."""
    with tamper(database_url) as db:
        where = LEDGER.c.sequence == target
        if kind == "edit" and field in TIME_FIELDS:
            old = db.execute(LEDGER.select().where(where)).one()._mapping[field]
            db.execute(update(LEDGER).where(where).values({field: old + timedelta(microseconds=1)}))
            return {target}
        if kind == "edit":
            db.execute(update(LEDGER).where(where).values({field: LEDGER.c[field] + "~"}))
            return {target}
        if kind == "delete":
            db.execute(LEDGER.delete().where(where))
            return {target}
        if kind == "swap":
            for old, new in ((target, -1), (other, target), (-1, other)):
                db.execute(
                    text("UPDATE ledger SET sequence = :n WHERE sequence = :o"),
                    {"o": old, "n": new},
                )
            return {target, other}
        if kind == "truncate":
            db.execute(text("DELETE FROM ledger WHERE sequence >= :s"), {"s": target})
            return {target}
        # rehash: edit, then recompute the row's own hash as a knowledgeable attacker would
        db.execute(update(LEDGER).where(where).values(evidence=LEDGER.c.evidence + "~"))
        with Session(db) as session:
            row = session.get(LedgerEntry, target)
            assert row is not None
            db.execute(update(LEDGER).where(where).values(row_hash=row_hash(row)))
        return {target + 1} if target < n else {target}


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_single_tamper_is_named(store: Store, database_url: str, data: st.DataObject) -> None:
    reset_ledger(database_url)
    entries = data.draw(st.lists(issuances(), min_size=2, max_size=6), label="entries")
    split = data.draw(st.integers(0, len(entries)), label="group commit split")
    store.append_issuances(entries[:split])
    for entry in entries[split:]:
        store.append_issuance(entry)
    assert store.verify_ledger().ok

    n = len(entries)
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    target = data.draw(st.integers(1, n), label="target")
    other = data.draw(st.integers(1, n).filter(lambda s: s != target), label="other")
    field = data.draw(st.sampled_from(TEXT_FIELDS + TIME_FIELDS), label="field")
    expected = apply_tamper(database_url, kind, target, other, field, n)

    report = store.verify_ledger()
    assert not report.ok
    assert expected <= report.problem_sequences, report.problems
