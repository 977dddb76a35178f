"""Join tokens: a single-use secret that names one SPIFFE ID (SPIRE's join-token
attestation), for machines that have no platform credential: a VM on premises, a laptop.

An operator runs ``meshca admin join-token create --spiffe-id ...``, which prints
``meshca-join.<43 base64url characters>`` (256 bits from :mod:`secrets`) and stores only
the token's SHA-256. The machine's agent presents it once as ``authorization: Bearer``
on the CA's token port and gets its first X509-SVID; it renews with that SVID on the mTLS
port from then on. The prefix routes a bearer token here (a JWT starts ``eyJ``); it also
lets secret scanners recognise a leaked token.

Why a plain SHA-256 and no salt or slow hash: the token has 256 random bits, so no one can
search digests back to tokens, and looking a token up by its digest compares nothing in
variable time that an attacker could measure.

The checks, in order, each refused with ``UNAUTHENTICATED`` and its own reason:
``join_token_malformed`` (not a join token's shape), ``join_token_unknown`` (no such
token), ``join_token_used``, ``join_token_revoked``, ``join_token_expired``,
``join_token_foreign_trust_domain`` (created for another CA), and
``join_token_wrong_identity`` (the CSR names another SPIFFE ID than the token). A CSR
that is unusable for other reasons is refused as such (``INVALID_ARGUMENT``) before the
token is spent, so a bad request never wastes a token. Then the token is spent by one
conditional update (:mod:`meshca.store.join_tokens`): across every replica sharing the
database, one request wins; the others get ``join_token_used``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from meshca.authn.base import Attestation, AuthMethod, Credential, Peer
from meshca.errors import AuthenticationError, CSRError, SpiffeIdError
from meshca.pki import csr as csr_checks
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.store.join_tokens import JoinTokenState, state_of, token_id
from meshca.store.models import JoinToken

__all__ = [
    "TOKEN_BYTES",
    "TOKEN_PREFIX",
    "JoinTokenAuthenticator",
    "JoinTokenLedger",
    "is_join_token",
    "new_token",
    "token_digest",
]

log = logging.getLogger(__name__)

TOKEN_PREFIX = "meshca-join."
TOKEN_BYTES = 32
"""Random bytes in a token (256 bits; ``secrets.token_urlsafe`` gives 43 characters)."""
_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{43}")


def new_token() -> str:
    """A fresh join token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> str:
    """Lowercase hex SHA-256 of the token's text: all the database keeps."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def is_join_token(token: str | None) -> bool:
    """Whether a bearer token is meant as a join token (by its prefix; checked in full by
    :class:`JoinTokenAuthenticator`)."""
    return token is not None and token.startswith(TOKEN_PREFIX)


class JoinTokenLedger(Protocol):
    """Where join tokens are kept (``meshca.store.Store``); blocking calls."""

    def find_join_token(self, token_sha256: str) -> JoinToken | None: ...

    def spend_join_token(self, token_sha256: str, peer: str, now: datetime) -> bool: ...


def _now() -> datetime:
    return datetime.now(UTC)


def _refusal(reason: str, message: str) -> AuthenticationError:
    return AuthenticationError(message, reason=reason)


class JoinTokenAuthenticator:
    """Accepts each join token once, for the SPIFFE ID it names."""

    method = AuthMethod.JOIN_TOKEN

    def __init__(
        self,
        trust_domain: TrustDomain,
        ledger: JoinTokenLedger,
        *,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self._trust_domain = trust_domain
        self._ledger = ledger
        self._clock = clock

    async def authenticate(self, credential: Credential, peer: Peer) -> Attestation:
        token = credential.bearer_token or ""
        if not _TOKEN.fullmatch(token):
            raise _refusal(
                "join_token_malformed",
                f"the bearer token starts like a join token ({TOKEN_PREFIX}) but is not one: "
                f"a join token is {TOKEN_PREFIX} and 43 base64url characters, as "
                "`meshca admin join-token create` printed it",
            )
        digest = token_digest(token)
        record = await asyncio.to_thread(self._ledger.find_join_token, digest)
        if record is None:
            raise _refusal(
                "join_token_unknown",
                f"this CA has no join token with id {digest[:16]} (was it created against "
                "another CA's database?); create one with `meshca admin join-token create`",
            )
        self._check_state(record)
        spiffe_id = self._identity(record)
        _check_csr(credential.csr, spiffe_id, record)
        now = self._clock()
        if not await asyncio.to_thread(self._ledger.spend_join_token, digest, peer.address, now):
            # Another request (here or in another replica) got there first, or the token
            # expired or was revoked meanwhile: say which.
            again = await asyncio.to_thread(self._ledger.find_join_token, digest)
            self._check_state(again or record)
            raise _refusal("join_token_used", f"join token {token_id(record)} was already used")
        log.info(
            "join token %s (created by %s) spent by %s for %s",
            token_id(record),
            record.created_by,
            peer.address,
            spiffe_id,
        )
        return Attestation(
            spiffe_id=spiffe_id,
            method=AuthMethod.JOIN_TOKEN,
            selectors=(
                f"join-token:id:{token_id(record)}",
                f"join-token:created-by:{record.created_by}",
            ),
        )

    def _check_state(self, record: JoinToken) -> None:
        state = state_of(record, self._clock())
        name = token_id(record)
        if state is JoinTokenState.USED:
            when = record.used_at.isoformat() if record.used_at else "?"
            raise _refusal(
                "join_token_used",
                f"join token {name} was already used at {when} by {record.used_by}; each "
                "token gets one certificate (the agent then renews with its SVID): create a "
                "new one with `meshca admin join-token create`",
            )
        if state is JoinTokenState.REVOKED:
            when = record.revoked_at.isoformat() if record.revoked_at else "?"
            raise _refusal("join_token_revoked", f"join token {name} was revoked at {when}")
        if state is JoinTokenState.EXPIRED:
            raise _refusal(
                "join_token_expired",
                f"join token {name} expired at {record.expires_at.isoformat()}; create a new "
                "one (`meshca admin join-token create --ttl ...`)",
            )

    def _identity(self, record: JoinToken) -> SpiffeId:
        try:
            spiffe_id = SpiffeId.parse(record.spiffe_id)
        except SpiffeIdError as exc:  # written outside meshca: the CLI checks it
            raise _refusal(
                "join_token_invalid_identity",
                f"join token {token_id(record)} names no valid SPIFFE ID: {exc}",
            ) from None
        if not spiffe_id.member_of(self._trust_domain):
            raise _refusal(
                "join_token_foreign_trust_domain",
                f"join token {token_id(record)} is for {spiffe_id}, outside this CA's trust "
                f"domain {self._trust_domain}",
            )
        return spiffe_id


def _check_csr(csr: bytes | str | None, spiffe_id: SpiffeId, record: JoinToken) -> None:
    """Refuse, before the token is spent, a CSR the CA would refuse for this identity."""
    if csr is None:
        return
    try:
        csr_checks.check_csr(csr_checks.load_csr(csr), spiffe_id)
    except CSRError as exc:
        if exc.reason != "csr_identity_mismatch":
            raise
        raise _refusal(
            "join_token_wrong_identity",
            f"join token {token_id(record)} is for {spiffe_id}, but the CSR asks for another "
            "identity; leave the URI SAN out of the CSR or set it to the token's SPIFFE ID "
            f"(the token is not spent): {exc.message}",
        ) from None
