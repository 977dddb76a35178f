"""Overload control at the request boundary.

A CA sits on every pod's start-up path, so under a burst it must answer quickly rather
than queue without end: a bound on requests in flight per process, and rate limits per
peer IP address (checked before any token is verified) and per SPIFFE ID (checked after).
Beyond a limit the caller gets RESOURCE_EXHAUSTED with a retry hint. Rate limits use a
sliding-window counter from the ``limits`` library, in process memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from limits import RateLimitItem, parse, storage, strategies

from meshca.errors import ConfigError, OverloadError

IN_FLIGHT_RETRY_AFTER = 0.05


def parse_rate(text: str | None, what: str) -> RateLimitItem | None:
    """``500/second``, ``100/minute`` (the ``limits`` notation); None or "" = no limit."""
    if not text:
        return None
    try:
        return parse(text)
    except ValueError as exc:
        raise ConfigError(f"{what} {text!r} is not a rate such as '500/second': {exc}") from exc


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
        self._per_peer = parse_rate(limits.per_peer, "rate_limit_per_peer")
        self._per_identity = parse_rate(limits.per_identity, "rate_limit_per_identity")
        self._limiter = strategies.SlidingWindowCounterRateLimiter(storage.MemoryStorage())

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
            self._hit(self._per_peer, "peer", _host(address), "rate_limited_peer")

    def check_identity(self, spiffe_id: str) -> None:
        if self._per_identity is not None:
            self._hit(self._per_identity, "identity", spiffe_id, "rate_limited_identity")

    def _hit(self, rate: RateLimitItem, kind: str, key: str, reason: str) -> None:
        if self._limiter.hit(rate, kind, key):
            return
        stats = self._limiter.get_window_stats(rate, kind, key)
        retry_after = max(0.01, min(stats.reset_time - time.time(), rate.get_expiry()))
        raise OverloadError(
            f"rate limit {rate} per {kind} reached for {key}; retry after {retry_after:.2f}s",
            reason=reason,
            retry_after=retry_after,
        )


def _host(address: str) -> str:
    """``1.2.3.4:5`` -> ``1.2.3.4``; ``[::1]:5`` -> ``::1``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address
    return host.strip("[]")
