"""Token buckets and rate notation: bursts, refill, retry hints, bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshca.api.admission import Admission, AdmissionLimits, Rate, TokenBuckets, parse_rate
from meshca.errors import ConfigError, OverloadError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("500/second", Rate(500, 1)),
        ("100/minute", Rate(100, 60)),
        ("10/5seconds", Rate(10, 5)),
        (" 3 / hour ", Rate(3, 3600)),
    ],
)
def test_rate_notation(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["500", "fast", "0/second", "5/fortnight", "-1/second"])
def test_bad_rates_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ConfigError, match="COUNT/PERIOD"):
        parse_rate(text)


@pytest.mark.parametrize("text", [None, "", "off", "None"])
def test_off_means_no_limit(text: str | None) -> None:
    assert parse_rate(text) is None


def test_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(Rate(5, 1), clock=clock)
    assert [buckets.take("a") for _ in range(5)] == [0.0] * 5
    wait = buckets.take("a")
    assert wait == pytest.approx(0.2)
    assert buckets.take("b") == 0.0  # keys are independent
    clock.now += 0.2
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0


def test_bucket_memory_is_bounded() -> None:
    buckets = TokenBuckets(Rate(1, 60), clock=Clock(), max_keys=100)
    for i in range(1000):
        buckets.take(f"peer-{i}")
    assert len(buckets._buckets) == 100


@given(st.lists(st.floats(min_value=0, max_value=2), max_size=200))
def test_never_more_than_the_burst_plus_refill(gaps: list[float]) -> None:
    clock = Clock()
    buckets = TokenBuckets(Rate(10, 1), clock=clock)
    allowed = 0
    for gap in gaps:
        clock.now += gap
        allowed += buckets.take("k") == 0.0
    assert allowed <= 10 + sum(gaps) * 10 + 1e-6


def test_admission_limits_peer_by_ip_not_port() -> None:
    admission = Admission(AdmissionLimits(per_peer="2/minute", per_identity=None))
    admission.check_peer("10.0.0.1:1000")
    admission.check_peer("10.0.0.1:2000")
    with pytest.raises(OverloadError) as info:
        admission.check_peer("10.0.0.1:3000")
    assert info.value.reason == "rate_limited_peer" and info.value.retry_after > 0
    admission.check_peer("[2001:db8::1]:1000")
