"""Google's token-signing keys, fetched from its OAuth2 certificate endpoint and cached.

Google signs instance identity tokens with rotating RSA keys published at
``https://www.googleapis.com/oauth2/v3/certs`` as a JWK Set (RFC 7517). (The v1
endpoint serves the same keys as PEM X.509 certificates, a format PyJWT's key
classes do not read; the JWK Set form is used here.) Keys are cached for as long as
the answer says (RFC 9111 section 4.2.1: ``Cache-Control: max-age`` minus ``Age``,
else ``Expires`` minus ``Date``), within :data:`MIN_KEYS_TTL` and
:data:`MAX_KEYS_TTL`. A token whose ``kid`` is not among the keys held triggers a
fetch, at most once per ``refresh_interval``, so made-up ``kid`` values cannot be
turned into a flood of requests to Google. When a fetch fails, the keys held are
kept in use until one succeeds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import aiohttp
import jwt

from meshca.authn._jwks import json_object
from meshca.errors import AuthenticationError

_log = logging.getLogger(__name__)

ALGORITHM = "RS256"
"""The one algorithm Google signs identity tokens with."""

MIN_KEYS_TTL = timedelta(seconds=60)
"""Keys are kept at least this long, whatever the headers say (``no-cache`` included):
one fetch per token would make every CA replica a load generator against Google."""
MAX_KEYS_TTL = timedelta(hours=24)
"""...and at most this long, so a retired key stops verifying tokens within a day."""
DEFAULT_KEYS_TTL = timedelta(minutes=5)
"""When the answer has no usable cache headers."""
MAX_KEYS_DOCUMENT_BYTES = 1024 * 1024


def _refusal(reason: str, message: str) -> AuthenticationError:
    return AuthenticationError(message, reason=reason)


def _http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def freshness_lifetime(headers: Mapping[str, str], now: datetime) -> float | None:
    """Seconds the answer stays fresh per RFC 9111 section 4.2.1; None if undetermined.

    ``Cache-Control: max-age`` (less ``Age``) wins over ``Expires``; ``no-store`` and
    ``no-cache`` mean zero; an invalid ``Expires`` means already stale (section 5.3).
    """
    directives: dict[str, str | None] = {}
    for part in headers.get("Cache-Control", "").split(","):
        name, sep, value = part.strip().partition("=")
        if name:
            directives[name.lower()] = value.strip().strip('"') if sep else None
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    max_age = directives.get("max-age")
    if max_age is not None and max_age.isdigit():
        age = headers.get("Age", "0").strip()
        return float(int(max_age) - (int(age) if age.isdigit() else 0))
    if "Expires" in headers:
        expires = _http_date(headers["Expires"])
        if expires is None:
            return 0.0
        date = _http_date(headers.get("Date")) or now
        return (expires - date).total_seconds()
    return None


def keys_ttl(headers: Mapping[str, str], now: datetime) -> float:
    """How long to keep keys fetched with ``headers``, clamped to the limits above."""
    lifetime = freshness_lifetime(headers, now)
    if lifetime is None:
        lifetime = DEFAULT_KEYS_TTL.total_seconds()
    return min(max(lifetime, MIN_KEYS_TTL.total_seconds()), MAX_KEYS_TTL.total_seconds())


def _claim_text(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class GoogleKeys:
    """The RS256 keys of Google's OAuth2 certificate endpoint, by ``kid``."""

    def __init__(
        self,
        url: str,
        *,
        timeout: timedelta = timedelta(seconds=5),
        refresh_interval: timedelta = timedelta(seconds=30),
    ) -> None:
        self.url = url
        self._timeout = timeout.total_seconds()
        self._interval = refresh_interval.total_seconds()
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self._keys: dict[str, jwt.PyJWK] | None = None
        self._fresh_until = 0.0
        self._attempted_at: float | None = None
        self.fetches = 0
        self.answered = False
        """Whether Google's key endpoint has ever given usable keys."""

    @property
    def issuer(self) -> str:
        """What is fetched, for logs and readiness."""
        return f"GCE (Google's signing keys at {self.url})"

    async def probe(self) -> None:
        """Fetch the keys now; AuthenticationError ``google_keys_unavailable`` says why not."""
        async with self._lock:
            await self._fetch()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _lookup(self, kid: str) -> jwt.PyJWK | None:
        return self._keys.get(kid) if self._keys is not None else None

    async def key_for(self, kid: str) -> jwt.PyJWK:
        """The key named ``kid``; AuthenticationError ``unknown_key`` or
        ``google_keys_unavailable`` (Google unreachable and no keys held)."""
        key = self._lookup(kid)
        if key is not None and time.monotonic() < self._fresh_until:
            return key
        async with self._lock:
            now = time.monotonic()
            key = self._lookup(kid)  # another request may have refreshed meanwhile
            if key is not None and now < self._fresh_until:
                return key
            if self._attempted_at is not None and now - self._attempted_at < self._interval:
                if key is not None:
                    return key  # stale, but a fetch was just tried
                wait = math.ceil(self._interval - (now - self._attempted_at))
                if self._keys is None:
                    raise _refusal(
                        "google_keys_unavailable",
                        f"Google's signing keys could not be fetched from {self.url}; "
                        f"next attempt in {wait}s",
                    )
                raise self._unknown(kid, f"keys were fetched recently; next refresh in {wait}s")
            self._attempted_at = now
            try:
                await self._fetch()
            except AuthenticationError as exc:
                if key is None:
                    raise
                _log.warning("refreshing Google's keys failed, using those held: %s", exc)
                return key
            key = self._lookup(kid)
            if key is None:
                raise self._unknown(kid, "not among the keys just fetched")
            return key

    def _unknown(self, kid: str, detail: str) -> AuthenticationError:
        return _refusal(
            "unknown_key",
            f"key id {_claim_text(kid)} is not one of Google's token-signing keys at "
            f"{self.url} ({detail})",
        )

    async def _fetch(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout)
            )
        self.fetches += 1
        try:
            async with self._session.get(
                self.url, headers={"Accept": "application/json"}
            ) as response:
                if response.status != 200:
                    raise _refusal(
                        "google_keys_unavailable", f"{self.url} answered HTTP {response.status}"
                    )
                raw = await _read_limited(response.content, MAX_KEYS_DOCUMENT_BYTES)
                headers = {
                    name: response.headers[name]
                    for name in ("Cache-Control", "Age", "Expires", "Date")
                    if name in response.headers
                }
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _refusal(
                "google_keys_unavailable",
                f"cannot fetch {self.url}: {type(exc).__name__}: {exc}".rstrip(": "),
            ) from None
        if raw is None:
            raise _refusal(
                "google_keys_unavailable",
                f"{self.url} sent more than {MAX_KEYS_DOCUMENT_BYTES} bytes",
            )
        self._keys = _rs256_keys(raw, self.url)
        self.answered = True
        ttl = keys_ttl(headers, datetime.now(UTC))
        self._fresh_until = time.monotonic() + ttl
        _log.info(
            "loaded %d Google signing key(s) from %s, kept %ds", len(self._keys), self.url, ttl
        )


async def _read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None if it is longer than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _rs256_keys(raw: bytes, source: str) -> dict[str, jwt.PyJWK]:
    """The RS256 signature keys of a JWK Set, by ``kid`` (every Google key has one)."""
    try:
        document = json_object(json.loads(raw))
    except (ValueError, RecursionError):
        document = None
    if document is None or not isinstance(document.get("keys"), list):
        raise _refusal("google_keys_unavailable", f"{source} is not a JWK Set (no 'keys' list)")
    try:
        keyset = jwt.PyJWKSet.from_dict(document)
    except jwt.PyJWTError as exc:
        raise _refusal("google_keys_unavailable", f"{source} holds no usable keys: {exc}") from None
    keys = {
        key.key_id: key
        for key in keyset
        if key.key_id and key.algorithm_name == ALGORITHM and key.public_key_use in (None, "sig")
    }
    if not keys:
        raise _refusal(
            "google_keys_unavailable", f"{source} holds no RS256 signature keys with a kid"
        )
    return keys
