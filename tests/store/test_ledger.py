"""Appending to the ledger, looking rows up, and what comes back out."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from meshca.errors import StoreError
from meshca.store import GENESIS_HASH, NewIssuance, Store, row_hash

from .helpers import T0, issuance


def test_appends_are_numbered_and_chained_from_genesis(store: Store) -> None:
    rows = [store.append_issuance(issuance(n)) for n in range(1, 4)]
    assert [r.sequence for r in rows] == [1, 2, 3]
    assert rows[0].prev_hash == GENESIS_HASH
    assert rows[1].prev_hash == rows[0].row_hash
    assert rows[2].prev_hash == rows[1].row_hash
    assert all(r.row_hash == row_hash(r) for r in rows)
    report = store.verify_ledger()
    assert report.ok
    assert (report.rows_checked, report.head_sequence) == (3, 3)


def test_group_commit_continues_the_same_chain(store: Store) -> None:
    first = store.append_issuance(issuance(1))
    batch = store.append_issuances([issuance(n) for n in range(2, 6)])
    assert [r.sequence for r in batch] == [2, 3, 4, 5]
    assert batch[0].prev_hash == first.row_hash
    assert store.append_issuances([]) == []
    assert store.counts().issued == 5
    assert store.verify_ledger().ok


def test_datetimes_come_back_aware_utc_and_exact(store: Store) -> None:
    """A +02:00 input is stored as the same instant in UTC, to the microsecond."""
    plus_two = timezone(timedelta(hours=2))
    local = datetime(2024, 5, 1, 14, 0, 0, 654321, tzinfo=plus_two)
    store.append_issuance(replace(issuance(1, request_id="req-tz"), issued_at=local))
    found = store.find_by_request_id("req-tz", issuance(1).spiffe_id)
    assert found is not None
    assert found.issued_at == local
    assert found.issued_at.tzinfo is UTC
    assert found.issued_at.microsecond == 654321
    assert found.not_after.tzinfo is UTC
    assert store.verify_ledger().ok


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="issued_at must be timezone-aware"):
        replace(issuance(1), issued_at=datetime(2024, 5, 1, 12, 0))


def test_find_by_request_id_returns_the_stored_certificate(store: Store) -> None:
    store.append_issuance(issuance(1, request_id="11111111-2222-4333-8444-555555555555"))
    store.append_issuance(issuance(2))
    owner = issuance(1).spiffe_id
    found = store.find_by_request_id("11111111-2222-4333-8444-555555555555", owner)
    assert found is not None
    assert found.sequence == 1
    assert found.certificate_pem == issuance(1).certificate_pem
    assert store.find_by_request_id("no-such-request", owner) is None
    # Another identity's request ids are not visible.
    other = issuance(2).spiffe_id
    assert store.find_by_request_id("11111111-2222-4333-8444-555555555555", other) is None


def test_request_ids_are_unique_per_identity(store: Store) -> None:
    same = "spiffe://cluster.local/ns/default/sa/web"
    store.append_issuance(issuance(1, request_id="dup", spiffe_id=same))
    with pytest.raises(StoreError) as info:
        store.append_issuance(issuance(2, request_id="dup", spiffe_id=same))
    assert info.value.reason == "integrity_error"
    # The same id from another identity is a different request.
    store.append_issuance(issuance(3, request_id="dup"))
    assert store.verify_ledger().ok


def test_unicode_and_nulls_round_trip_and_verify(store: Store) -> None:
    entry = NewIssuance(
        serial_hex="01",
        spiffe_id="spiffe://example.org/ns/ünïcødé/sa/✓",
        auth_method="gce-iit",
        evidence="gce:project-id:p,gce:zone:europe-west1-b",
        peer_address="[2001:db8::1]:443",
        not_before=T0,
        not_after=T0 + timedelta(hours=1),
        intermediate_fingerprint="cd" * 32,
        certificate_pem="PEM",
        issued_at=T0,
    )
    row = store.append_issuance(entry)
    assert row.request_id is None and row.csr_sha256 is None
    report = store.verify_ledger()
    assert report.ok, report.problems


def test_empty_ledger_verifies(store: Store) -> None:
    report = store.verify_ledger()
    assert report.ok
    assert (report.rows_checked, report.head_sequence) == (0, 0)
