"""SPIFFE ID and trust domain parsing (SPIFFE-ID spec, section 2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshca.errors import SpiffeIdError
from meshca.spiffe import SpiffeId, TrustDomain

GOOD = [
    "spiffe://cluster.local/ns/default/sa/web",
    "spiffe://example.org",
    "spiffe://a-b_c.d/A.B-c_D/x",
]

BAD = {
    "wrong-scheme": "https://example.org/ns/a/sa/b",
    "uppercase-scheme": "SPIFFE://example.org/x",
    "empty-trust-domain": "spiffe:///ns/a",
    "uppercase-trust-domain": "spiffe://Example.org/x",
    "port": "spiffe://example.org:8443/x",
    "user-info": "spiffe://user@example.org/x",
    "query": "spiffe://example.org/x?y=1",
    "fragment": "spiffe://example.org/x#y",
    "trailing-slash": "spiffe://example.org/x/",
    "empty-segment": "spiffe://example.org/x//y",
    "dot-segment": "spiffe://example.org/x/./y",
    "dot-dot-segment": "spiffe://example.org/x/../y",
    "percent-encoding": "spiffe://example.org/x%20y",
    "too-long": "spiffe://example.org/" + "a" * 2048,
    "no-scheme": "example.org/x",
}


@pytest.mark.parametrize("text", GOOD)
def test_valid_ids_round_trip(text: str) -> None:
    assert str(SpiffeId.parse(text)) == text


@pytest.mark.parametrize("name", sorted(BAD))
def test_invalid_ids_are_refused_with_a_reason(name: str) -> None:
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.parse(BAD[name])
    assert info.value.message


def test_workload_id_for_kubernetes() -> None:
    sid = TrustDomain("cluster.local").workload("default", "web")
    assert str(sid) == "spiffe://cluster.local/ns/default/sa/web"
    assert sid.member_of(TrustDomain("cluster.local"))
    assert not sid.member_of(TrustDomain("other.local"))


def test_trust_domain_accepts_bare_name_or_id_but_not_workload() -> None:
    assert TrustDomain.parse("spiffe://example.org") == TrustDomain("example.org")
    with pytest.raises(SpiffeIdError, match="workload ID"):
        TrustDomain.parse("spiffe://example.org/x")


@given(st.text(max_size=300))
def test_parser_never_fails_other_than_with_spiffe_id_error(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except SpiffeIdError:
        return
    assert str(sid) == text


_td = st.from_regex(r"[a-z0-9._-]{1,40}", fullmatch=True)
_seg = st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True).filter(lambda s: s not in (".", ".."))


@given(_td, st.lists(_seg, max_size=6))
def test_every_spec_conformant_id_parses(td: str, segments: list[str]) -> None:
    text = f"spiffe://{td}" + "".join(f"/{s}" for s in segments)
    sid = SpiffeId.parse(text)
    assert sid.trust_domain.name == td
    assert str(sid) == text
