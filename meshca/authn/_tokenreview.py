"""Ask a cluster's API server whether a token is valid: the TokenReview v1 API.

``POST /apis/authentication.k8s.io/v1/tokenreviews`` with the token and the audiences
the CA expects (Kubernetes API reference, "TokenReview v1 authentication.k8s.io").
The answer is trusted only if ``status.authenticated`` is true, ``status.audiences``
intersects the audiences asked for (the API reference: a client that sets
``spec.audiences`` "should validate that a compatible audience identifier is returned
in the status.audiences field to ensure that the TokenReview server is audience
aware"), the user is in the ``system:serviceaccounts`` group, and the user name is
``system:serviceaccount:<ns>:<sa>``. Pod binding comes from ``status.user.extra``
(``authentication.kubernetes.io/pod-name`` and ``pod-uid``, and ``node-name`` from
Kubernetes 1.30).

Positive answers are cached, keyed by the SHA-256 of the token, until the earlier of
the token's own ``exp`` and ``cache_ttl``. Refusals are never cached.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time

import aiohttp

from meshca.authn._cache import DEFAULT_CACHE_SIZE, VerifiedTokenCache
from meshca.authn._jwks import (
    ServiceAccountIdentity,
    json_object,
    parse_service_account_username,
    unverified_expiry,
)
from meshca.authn.base import AuthMethod
from meshca.config import TokenReviewCluster
from meshca.errors import AuthenticationError

_log = logging.getLogger(__name__)

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
SERVICE_ACCOUNTS_GROUP = "system:serviceaccounts"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
_MAX_ERROR_TEXT = 200
PROBE_TOKEN = "meshca-readiness-probe"
"""Not a JWT: no API server can authenticate it."""


def _refusal(reason: str, message: str) -> AuthenticationError:
    return AuthenticationError(message, reason=reason)


def _strings(value: object) -> list[str]:
    """A JSON array of strings as a list; anything else as an empty list."""
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _single(extra: dict[str, object], name: str) -> str | None:
    values = _strings(extra.get(name))
    return values[0] if len(values) == 1 and values[0] else None


class TokenReviewer:
    """Validates tokens for one cluster by asking its API server (TokenReview v1)."""

    method = AuthMethod.K8S_TOKEN_REVIEW

    def __init__(
        self,
        cluster: TokenReviewCluster,
        ssl_context: ssl.SSLContext | None,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self._cluster = cluster
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session: aiohttp.ClientSession | None = None
        self._url = cluster.api_server + TOKENREVIEW_PATH
        self.cache = VerifiedTokenCache(cache_size)
        self.answered = False
        """Whether the API server has ever answered a TokenReview."""

    @property
    def issuer(self) -> str:
        """What this reviewer asks, for logs and readiness."""
        return f"cluster {self._cluster.cluster_id!r} (TokenReview at {self._cluster.api_server})"

    async def probe(self) -> None:
        """Have the API server review a placeholder token (it answers ``authenticated:
        false``): proves it is reachable and takes meshca's credentials and RBAC.
        AuthenticationError ``tokenreview_unavailable`` says why not."""
        await self._review(PROBE_TOKEN)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def verify(self, token: str) -> ServiceAccountIdentity:
        """Return the identity the API server vouches for, or raise AuthenticationError."""
        cached = self.cache.get(token, time.time())
        if cached is not None:
            return cached
        status = await self._review(token)
        identity = self._judge(status, token)
        self.cache.remember(token, identity, self._cluster.cache_ttl, time.time())
        return identity

    async def _credentials(self) -> str | None:
        path = self._cluster.credentials_file
        if path is None:
            return None
        try:
            text = await asyncio.to_thread(path.read_text)
        except OSError as exc:
            raise self._unavailable(
                f"cannot read credentials_file {path}: {exc.strerror}"
            ) from None
        return text.strip()

    def _unavailable(self, detail: str) -> AuthenticationError:
        return _refusal(
            "tokenreview_unavailable",
            f"the Kubernetes API server of cluster {self._cluster.cluster_id!r} could not be "
            f"reached to review the token ({detail}); the token itself was not judged",
        )

    async def _review(self, token: str) -> dict[str, object]:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(self._cluster.audiences)},
        }
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        credentials = await self._credentials()
        if credentials:
            headers["Authorization"] = f"Bearer {credentials}"
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._cluster.timeout.total_seconds())
            )
        try:
            async with self._session.post(
                self._url, data=json.dumps(body), headers=headers, ssl=self._ssl
            ) as response:
                status_code = response.status
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unavailable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        if status_code in (401, 403):
            raise self._unavailable(
                f"HTTP {status_code}: the API server refused meshca's own credentials; "
                "check credentials_file and RBAC for tokenreviews create"
            )
        if status_code not in (200, 201):
            raise self._unavailable(f"HTTP {status_code} from {self._url}")
        try:
            document = json_object(json.loads(raw))
        except (ValueError, RecursionError):
            document = None
        status = json_object(document.get("status")) if document is not None else None
        if status is None:
            raise self._unavailable("the answer is not a TokenReview with a status")
        self.answered = True
        return status

    def _judge(self, status: dict[str, object], token: str) -> ServiceAccountIdentity:
        """Apply the checks of the module docstring to ``status``."""
        if status.get("authenticated") is not True:
            error = status.get("error")
            detail = ""
            if isinstance(error, str) and error and token not in error:
                detail = f": {error[:_MAX_ERROR_TEXT]}"
            raise _refusal(
                "token_rejected", f"the API server did not authenticate the token{detail}"
            )
        wanted = set(self._cluster.audiences)
        echoed = _strings(status.get("audiences"))
        if not wanted.intersection(echoed):
            raise _refusal(
                "wrong_audience",
                f"the API server did not confirm the token is for any of "
                f"{sorted(wanted)} (status.audiences: {echoed[:5]})",
            )
        user = json_object(status.get("user")) or {}
        if SERVICE_ACCOUNTS_GROUP not in _strings(user.get("groups")):
            raise _refusal(
                "not_a_service_account",
                f"the token's user is not in the {SERVICE_ACCOUNTS_GROUP!r} group",
            )
        username = user.get("username")
        parsed = parse_service_account_username(username) if isinstance(username, str) else None
        if parsed is None:
            raise _refusal(
                "not_a_service_account",
                "the token's user name is not system:serviceaccount:<namespace>:<name>",
            )
        extra = json_object(user.get("extra")) or {}
        return ServiceAccountIdentity(
            namespace=parsed[0],
            service_account=parsed[1],
            pod_name=_single(extra, POD_NAME_EXTRA),
            pod_uid=_single(extra, POD_UID_EXTRA),
            expires_at=unverified_expiry(token),
            node_name=_single(extra, NODE_NAME_EXTRA),
        )
