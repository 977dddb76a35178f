"""Roots and intermediates: one active root, foreign keys, listing order, counts."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from meshca.errors import StoreError
from meshca.store import IntermediateRecord, RootRecord, Store

from .helpers import T0, issuance


def root(fp_char: str, state: str = "active") -> RootRecord:
    return RootRecord(
        fingerprint=fp_char * 64,
        subject=f"O=cluster.local, CN=meshca root {fp_char}",
        backend="pkcs11",
        key_ref=f"token=meshca;label=root-{fp_char}",
        algorithm="ecdsa-p256",
        certificate_pem=f"ROOT {fp_char}",
        not_before=T0,
        not_after=T0 + timedelta(days=3650),
        state=state,
    )


def intermediate(fp_char: str, root_fp: str) -> IntermediateRecord:
    return IntermediateRecord(
        fingerprint=fp_char * 64,
        serial_hex="7f" * 10,
        root_fingerprint=root_fp,
        certificate_pem=f"INTERMEDIATE {fp_char}",
        not_before=T0,
        not_after=T0 + timedelta(hours=48),
        owner="ca-0:4242",
    )


def test_adding_an_active_root_retires_the_previous_one(store: Store) -> None:
    assert store.active_root() is None
    store.add_root(root("a"))
    store.add_root(root("b"))
    active = store.active_root()
    assert active is not None and active.fingerprint == "b" * 64
    assert [(r.fingerprint[0], r.state) for r in store.list_roots()] == [
        ("a", "retired"),
        ("b", "active"),
    ]
    assert active.not_after.tzinfo is not None


def test_a_retired_root_does_not_displace_the_active_one(store: Store) -> None:
    store.add_root(root("a"))
    store.add_root(root("b", state="retired"))
    active = store.active_root()
    assert active is not None and active.fingerprint == "a" * 64


def test_racing_active_roots_leave_exactly_one_active(store: Store, database_url: str) -> None:
    stores = [Store(database_url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))

    def add(i: int) -> None:
        barrier.wait()
        stores[i].add_root(root("abcd"[i]))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    states = [r.state for r in store.list_roots()]
    assert sorted(states) == ["active", "retired", "retired", "retired"]


def test_duplicate_root_fingerprint_is_a_store_error(store: Store) -> None:
    store.add_root(root("a"))
    with pytest.raises(StoreError, match=r"adding root a{64} failed") as info:
        store.add_root(root("a", state="retired"))
    assert info.value.reason == "integrity_error"


def test_invalid_root_fields_are_refused(store: Store) -> None:
    bad = root("a")
    bad.state = "pending"
    with pytest.raises(ValueError, match="root state 'pending'"):
        store.add_root(bad)


def test_intermediates_need_their_root_and_list_newest_first(store: Store) -> None:
    store.add_root(root("a"))
    store.add_intermediate(intermediate("1", "a" * 64))
    store.add_intermediate(intermediate("2", "a" * 64))
    with pytest.raises(StoreError, match="adding intermediate") as info:
        store.add_intermediate(intermediate("3", "f" * 64))
    assert info.value.reason == "integrity_error"
    assert [i.fingerprint[0] for i in store.list_intermediates()] == ["2", "1"]
    assert [i.fingerprint[0] for i in store.list_intermediates(limit=1)] == ["2"]
    latest = store.list_intermediates(limit=1)[0]
    assert latest.owner == "ca-0:4242"
    assert latest.created_at.tzinfo is not None


def test_counts(store: Store) -> None:
    store.add_root(root("a"))
    store.add_intermediate(intermediate("1", "a" * 64))
    store.append_issuances([issuance(1), issuance(2)])
    counts = store.counts()
    assert (counts.roots, counts.intermediates, counts.issued) == (1, 1, 2)
