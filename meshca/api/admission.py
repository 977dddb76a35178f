"""Overload control at the request boundary.

A CA sits on every pod's start-up path, so under a burst it must answer quickly rather
than queue without end: a bound on requests in flight per process, and rate limits per
peer IP address (checked before any token is verified) and per SPIFFE ID (checked after).
Beyond a limit the caller gets RESOURCE_EXHAUSTED with a retry hint.

Rate limits are token buckets held in the process (a burst of up to the rate's count,
refilled continuously). The ``limits`` library was measured first: its in-memory storage
starts a timer thread every few milliseconds under load, and its asyncio storage hops to a
thread per key, both on the hot path of every request; a bucket is a few lines of
arithmetic without either.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from meshca.errors import ConfigError, OverloadError

IN_FLIGHT_RETRY_AFTER = 0.05
MAX_TRACKED_KEYS = 100_000
_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(second|minute|hour|day)s?\s*$")


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` requests per ``period`` seconds; also the burst a bucket allows."""

    count: int
    period: float

    def __str__(self) -> str:
        return f"{self.count} per {self.period:g}s"


def parse_rate(text: str | None, what: str = "rate") -> Rate | None:
    """``500/second``, ``100/minute``, ``10/5second``; None, "" or ``off`` = no limit."""
    if text is None or text.strip().lower() in ("", "off", "none"):
        return None
    match = _RATE.match(text.lower())
    if match is None or int(match.group(1)) == 0:
        raise ConfigError(
            f"{what} {text!r} is not a rate: write COUNT/PERIOD such as '500/second', "
            "'100/minute' or '10/5second' (or 'off')"
        )
    multiple = int(match.group(2) or 1)
    return Rate(int(match.group(1)), multiple * _PERIODS[match.group(3)])


class TokenBuckets:
    """One token bucket per key; the least recently used keys are forgotten past a bound."""

    def __init__(
        self,
        rate: Rate,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_TRACKED_KEYS,
    ) -> None:
        self.rate = rate
        self._refill = rate.count / rate.period
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Take one token; return 0 when allowed, else the seconds until one is free."""
        now = self._clock()
        tokens, then = self._buckets.get(key, (float(self.rate.count), now))
        tokens = min(float(self.rate.count), tokens + (now - then) * self._refill)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            self._buckets.move_to_end(key)
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self._refill


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_in_flight: int = 512
    per_peer: str | None = "500/second"
    per_identity: str | None = "100/second"


class Admission:
    """Counts requests in flight and applies the rate limits of one process."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self._max_in_flight = limits.max_in_flight
        self._in_flight = 0
        per_peer = parse_rate(limits.per_peer, "rate_limit_per_peer")
        per_identity = parse_rate(limits.per_identity, "rate_limit_per_identity")
        self._per_peer = TokenBuckets(per_peer) if per_peer else None
        self._per_identity = TokenBuckets(per_identity) if per_identity else None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one in-flight slot for the duration of a request, or refuse at once."""
        if self._in_flight >= self._max_in_flight:
            raise OverloadError(
                f"the CA is at its limit of {self._max_in_flight} requests in flight; "
                f"retry after {IN_FLIGHT_RETRY_AFTER:g}s",
                reason="too_many_in_flight",
                retry_after=IN_FLIGHT_RETRY_AFTER,
            )
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    def check_peer(self, address: str) -> None:
        """Apply the per-peer-IP limit (the port is not part of the key)."""
        if self._per_peer is not None:
            _take(self._per_peer, "peer", _host(address), "rate_limited_peer")

    def check_identity(self, spiffe_id: str) -> None:
        if self._per_identity is not None:
            _take(self._per_identity, "identity", spiffe_id, "rate_limited_identity")


def _take(buckets: TokenBuckets, kind: str, key: str, reason: str) -> None:
    wait = buckets.take(key)
    if wait > 0:
        raise OverloadError(
            f"rate limit {buckets.rate} per {kind} reached for {key}; retry after {wait:.2f}s",
            reason=reason,
            retry_after=wait,
        )


def _host(address: str) -> str:
    """``1.2.3.4:5`` -> ``1.2.3.4``; ``[::1]:5`` -> ``::1``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address
    return host.strip("[]")
