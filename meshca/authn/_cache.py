"""A cache of verified service-account tokens, so a burst of requests presenting the same
token (a pod's retries, a restart storm) costs one verification, not one per request.

Only positive results are kept, keyed by the SHA-256 of the token: the token itself is
never stored, so a dump of the cache yields nothing replayable.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # _jwks uses this cache
    from meshca.authn._jwks import ServiceAccountIdentity

DEFAULT_CACHE_SIZE = 10_000


class VerifiedTokenCache:
    """Positive verification results, keyed by ``sha256(token)``, oldest evicted first.

    The token itself is never stored: a dump of the cache yields nothing replayable.
    """

    def __init__(self, max_entries: int = DEFAULT_CACHE_SIZE) -> None:
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[ServiceAccountIdentity, float]] = OrderedDict()

    @staticmethod
    def key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def get(self, token: str, now: float) -> ServiceAccountIdentity | None:
        key = self.key(token)
        entry = self._entries.get(key)
        if entry is None:
            return None
        identity, until = entry
        if now >= until:
            del self._entries[key]
            return None
        return identity

    def put(self, token: str, identity: ServiceAccountIdentity, until: float) -> None:
        key = self.key(token)
        self._entries[key] = (identity, until)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def remember(
        self, token: str, identity: ServiceAccountIdentity, ttl: timedelta, now: float
    ) -> None:
        """Cache ``identity`` until the earlier of the token's expiry and ``now + ttl``."""
        until = now + ttl.total_seconds()
        if identity.expires_at is not None:
            until = min(until, identity.expires_at.timestamp())
        if until > now:
            self.put(token, identity, until)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> Iterator[str]:
        return iter(self._entries)
