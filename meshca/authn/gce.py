"""GCE instance identity tokens: which VM is calling, according to Google.

A Compute Engine VM asks its metadata server for an identity token
(``instance/service-accounts/default/identity?audience=<aud>&format=full``) and
presents it as ``authorization: Bearer``. The token is a JWT signed by Google
("Verifying the identity of instances", Compute Engine documentation) and is checked
here as Google documents it:

* RS256 only, signed by a current key from Google's OAuth2 certificate endpoint
  (:mod:`._gce_keys`: a JWK Set, cached per its HTTP cache headers);
* ``iss`` exactly ``https://accounts.google.com`` or ``accounts.google.com``; ``aud``
  this CA's audience (default ``spiffe://<trust-domain>``); ``exp`` and ``iat`` within
  a small leeway (RFC 7519 section 4.1);
* the ``format=full`` claims under ``google.compute_engine``: ``project_id``,
  ``project_number``, ``zone``, ``instance_id``, ``instance_name``,
  ``instance_creation_timestamp``; the VM's service account is ``email`` when
  ``email_verified`` is true.

Then policy: the project must be in the allow-list, and the first identity mapping rule
that matches (:mod:`._gce_rules`) gives the SPIFFE ID. Last, replay: a token is good for
one issuance. Its SHA-256 is recorded in the store (never the token) until the token
expires, by an insert that fails on a second use, so every CA replica sharing the
database refuses a token seen by any of them. Tokens must be in canonical compact form
(RFC 7515 section 7.1, unpadded base64url with no stray bits), so a used token cannot
be re-encoded into a "new" one with the same signature.

Reason codes raised (``AuthenticationError.reason``): ``missing_token``,
``token_too_large``, ``malformed_token``, ``bad_algorithm``, ``unknown_key``,
``bad_signature``, ``google_keys_unavailable``, ``token_expired``,
``token_not_yet_valid``, ``wrong_audience``, ``wrong_issuer``, ``missing_claims``,
``standard_format_token``, ``missing_google_claims``, ``invalid_google_claims``,
``project_not_allowed``, ``no_mapping_rule``, ``invalid_identity``, ``token_replayed``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

import jwt

from meshca.authn._gce_keys import ALGORITHM, GoogleKeys
from meshca.authn._gce_rules import GceInstance, MappingRule, compile_rules
from meshca.authn._jwks import epoch_to_datetime, json_object, unverified_claims
from meshca.authn.base import Attestation, AuthMethod, Credential, Peer
from meshca.config import GceConfig
from meshca.durations import format_duration
from meshca.errors import AuthenticationError, StoreError
from meshca.spiffe import SpiffeId, TrustDomain

__all__ = [
    "GOOGLE_ISSUERS",
    "MAX_TOKEN_BYTES",
    "GceAuthenticator",
    "TokenLedger",
    "is_google_token",
    "token_digest",
]

_log = logging.getLogger(__name__)

GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
"""The ``iss`` values of Google-signed ID tokens (OpenID Connect, Google Identity docs)."""

MAX_TOKEN_BYTES = 8 * 1024
"""Longer tokens are refused unread (a ``format=full`` token is about 1.2 KiB)."""

PEEK_MAX_BYTES = 16 * 1024
""":func:`is_google_token` reads no further than this (the Kubernetes path's limit)."""

PURGE_INTERVAL = timedelta(minutes=5)
"""How often expired token digests are deleted from the store (by the replica that
notices first; the delete is idempotent)."""

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_REQUIRED = ("project_id", "project_number", "zone", "instance_id", "instance_name")
_NAME_VALUE = re.compile(r"[a-z0-9][a-z0-9.:-]{0,99}")
"""Project ids (also domain-scoped ``example.com:p``), zones and instance names."""
_NUMBER = re.compile(r"[0-9]{1,30}")
_EMAIL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}@[A-Za-z0-9.-]{1,150}")


class TokenLedger(Protocol):
    """Where used-token digests are kept (``meshca.store.Store``); blocking calls."""

    def record_token_use(self, token_sha256: str, method: str, expires_at: datetime) -> bool:
        """True the first time a digest is recorded; False when it already was."""
        ...

    def purge_used_tokens(self, now: datetime) -> int:
        """Delete digests whose tokens expired before ``now``; how many were deleted."""
        ...


def token_digest(token: str) -> str:
    """Lowercase hex SHA-256 of the token: what the replay table keeps."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def is_google_token(token: str | None) -> bool:
    """Whether a bearer token says (without any verification) Google issued it.

    Used only to route the token to :class:`GceAuthenticator`, which verifies it in
    full; a token routed elsewhere is verified there against that issuer's keys.
    """
    if not token or len(token) > PEEK_MAX_BYTES:
        return False
    claims = unverified_claims(token)
    return claims is not None and claims.get("iss") in GOOGLE_ISSUERS


def _refusal(reason: str, message: str) -> AuthenticationError:
    return AuthenticationError(message, reason=reason)


def _quoted(value: object, limit: int = 80) -> str:
    """A claim value quoted for a message, shortened: claims are caller-chosen text."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _canonical_segment(segment: str) -> bool:
    """Unpadded base64url with no stray bits: re-encoding gives back the same text."""
    if not _SEGMENT.fullmatch(segment) or len(segment) % 4 == 1:
        return False
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return False
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == segment


def _map_jwt_error(exc: jwt.PyJWTError, config: GceConfig) -> AuthenticationError:
    """Translate a PyJWT failure into a refusal with a stable reason."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return _refusal("token_expired", "the GCE identity token has expired (it lives 1 hour)")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return _refusal(
            "token_not_yet_valid",
            "the GCE identity token's iat is in the future beyond the "
            f"{format_duration(config.leeway)} leeway: is the VM's or the CA's clock wrong?",
        )
    if isinstance(exc, jwt.InvalidAudienceError):
        return _refusal(
            "wrong_audience",
            f"the GCE identity token's audience (aud) is not {config.audience!r}; the agent "
            "must ask the metadata server for a token with that audience",
        )
    if isinstance(exc, jwt.InvalidIssuerError):
        return _refusal(
            "wrong_issuer",
            f"the token's issuer (iss) is not Google ({' or '.join(GOOGLE_ISSUERS)})",
        )
    if isinstance(exc, jwt.InvalidSignatureError):
        return _refusal("bad_signature", "the GCE identity token's signature does not verify")
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return _refusal("bad_algorithm", f"the token's algorithm is not accepted: {exc}")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return _refusal("missing_claims", f"the GCE identity token has no {exc.claim!r} claim")
    return _refusal("malformed_token", f"the token is not a well-formed JWT: {exc}")


class GceAuthenticator:
    """Authenticates GCE VMs by their instance identity token; see the module docstring.

    ``ledger`` keeps the digests of used tokens (the store, shared by every replica).
    Raises ConfigError at construction for a rule that is invalid. Call :meth:`close`
    to release the HTTP connection to Google.
    """

    method = AuthMethod.GCE_IDENTITY

    def __init__(self, trust_domain: TrustDomain, config: GceConfig, ledger: TokenLedger) -> None:
        self._trust_domain = trust_domain
        self._config = config
        self._ledger = ledger
        self._projects = frozenset(config.projects)
        self._rules: tuple[MappingRule, ...] = compile_rules(
            config.rules, trust_domain, config.projects
        )
        self.keys = GoogleKeys(
            config.certs_url,
            timeout=config.timeout,
            refresh_interval=config.keys_refresh_interval,
        )
        self._purged_at: float | None = None

    @property
    def audience(self) -> str:
        return self._config.audience

    @property
    def issuers(self) -> tuple[GoogleKeys]:
        """Google's key endpoint, as :mod:`meshca.authn.issuers` watches it."""
        return (self.keys,)

    async def close(self) -> None:
        await self.keys.close()

    async def authenticate(self, credential: Credential, peer: Peer) -> Attestation:
        """Verify the token, apply policy, record its use; AuthenticationError if refused."""
        try:
            token = self._checked_token(credential.bearer_token)
            claims = await self._verify(token)
            vm = _instance(claims)
            spiffe_id = self._map(vm)
            expires_at = epoch_to_datetime(claims.get("exp"))
            if expires_at is None:
                raise _refusal("malformed_token", "the token's exp is not a usable NumericDate")
            await self._first_use(token, expires_at)
        except AuthenticationError as exc:
            _log.info(
                "refused GCE identity token from %s: %s (reason=%s)",
                peer.address,
                exc.message,
                exc.reason,
            )
            raise
        selectors = [
            f"gce:project-id:{vm.project_id}",
            f"gce:project-number:{vm.project_number}",
            f"gce:zone:{vm.zone}",
            f"gce:instance-id:{vm.instance_id}",
            f"gce:instance-name:{vm.instance_name}",
        ]
        if vm.service_account is not None:
            selectors.append(f"gce:service-account:{vm.service_account}")
        _log.debug("authenticated %s as %s from %s", vm.describe(), spiffe_id, peer.address)
        return Attestation(
            spiffe_id=spiffe_id,
            method=self.method,
            selectors=tuple(selectors),
            expires_at=expires_at,
        )

    # -- the token --------------------------------------------------------------------

    @staticmethod
    def _checked_token(token: str | None) -> str:
        if not token:
            raise _refusal("missing_token", "no bearer token was presented")
        if len(token) > MAX_TOKEN_BYTES:
            raise _refusal(
                "token_too_large",
                f"the bearer token is {len(token)} bytes; a GCE identity token is at most "
                f"{MAX_TOKEN_BYTES}",
            )
        segments = token.split(".")
        if len(segments) != 3 or not all(_canonical_segment(s) for s in segments):
            raise _refusal(
                "malformed_token",
                "the token is not a JWS in canonical compact form (three unpadded base64url "
                "segments, RFC 7515 section 7.1)",
            )
        return token

    async def _verify(self, token: str) -> dict[str, object]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _refusal(
                "malformed_token", f"the token is not a well-formed JWT: {exc}"
            ) from None
        alg = header.get("alg")
        if alg != ALGORITHM:
            raise _refusal(
                "bad_algorithm",
                f"the token's algorithm {_quoted(alg)} is not accepted; Google signs "
                f"identity tokens with {ALGORITHM} only",
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _refusal(
                "unknown_key", "the token names no signing key (kid); Google's tokens always do"
            )
        key = await self.keys.key_for(kid)
        try:
            claims: dict[str, object] = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._config.audience,
                issuer=GOOGLE_ISSUERS,
                leeway=self._config.leeway,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise _map_jwt_error(exc, self._config) from None
        return claims

    # -- policy -----------------------------------------------------------------------

    def _map(self, vm: GceInstance) -> SpiffeId:
        if vm.project_id not in self._projects:
            raise _refusal(
                "project_not_allowed",
                f"{vm.describe()}: project {vm.project_id!r} is not among the "
                f"{len(self._projects)} project(s) this CA accepts (gce_projects)",
            )
        for rule in self._rules:
            if not rule.matches(vm):
                continue
            try:
                return rule.spiffe_id(self._trust_domain, vm)
            except ValueError as exc:
                raise _refusal(
                    "invalid_identity", f"{rule.describe()} gives {vm.describe()} no ID: {exc}"
                ) from None
        sa = f" with service account {vm.service_account}" if vm.service_account else ""
        raise _refusal(
            "no_mapping_rule",
            f"no gce_rules entry maps {vm.describe()}{sa} to a SPIFFE ID",
        )

    # -- replay -----------------------------------------------------------------------

    async def _first_use(self, token: str, expires_at: datetime) -> None:
        """Record the token's use, or refuse it as a replay.

        The digest is kept until the token can no longer be accepted anywhere:
        its ``exp`` plus the leeway.
        """
        keep_until = expires_at + self._config.leeway
        first = await asyncio.to_thread(
            self._ledger.record_token_use, token_digest(token), str(self.method), keep_until
        )
        if not first:
            raise _refusal(
                "token_replayed",
                "this GCE identity token was already used for a certificate; each token is "
                "good for one request: fetch a fresh one from the metadata server",
            )
        await self._purge_if_due()

    async def _purge_if_due(self) -> None:
        now = time.monotonic()
        if self._purged_at is not None and now - self._purged_at < PURGE_INTERVAL.total_seconds():
            return
        self._purged_at = now
        try:
            removed = await asyncio.to_thread(self._ledger.purge_used_tokens, datetime.now(UTC))
        except StoreError as exc:
            _log.warning("could not delete expired token digests (will retry): %s", exc)
            return
        if removed:
            _log.debug("deleted %d expired token digest(s)", removed)


def _instance(claims: dict[str, object]) -> GceInstance:
    """Read the ``format=full`` claims of a verified token."""
    if "google" not in claims:
        raise _refusal(
            "standard_format_token",
            "the token has no 'google' claim: it is a format=standard token (or not a GCE "
            "instance token); the agent must ask the metadata server for format=full",
        )
    google = json_object(claims.get("google"))
    engine = json_object(google.get("compute_engine")) if google is not None else None
    if engine is None:
        raise _refusal(
            "missing_google_claims",
            "the token's 'google' claim has no 'compute_engine' object: it does not "
            "describe a Compute Engine instance",
        )
    missing = [name for name in (*_REQUIRED, "instance_creation_timestamp") if name not in engine]
    if missing:
        raise _refusal(
            "missing_google_claims",
            "the token lacks google.compute_engine." + ", google.compute_engine.".join(missing),
        )
    values: dict[str, str] = {}
    for name in _REQUIRED:
        raw = engine[name]
        if (
            isinstance(raw, int)
            and not isinstance(raw, bool)
            and name
            in (
                "project_number",
                "instance_id",
            )
        ):
            raw = str(raw)
        pattern = _NUMBER if name in ("project_number", "instance_id") else _NAME_VALUE
        if not isinstance(raw, str) or not pattern.fullmatch(raw):
            raise _refusal(
                "invalid_google_claims",
                f"google.compute_engine.{name} {_quoted(raw)} is not a valid GCE {name}",
            )
        values[name] = raw
    created = epoch_to_datetime(engine["instance_creation_timestamp"])
    if created is None:
        raise _refusal(
            "invalid_google_claims",
            "google.compute_engine.instance_creation_timestamp "
            f"{_quoted(engine['instance_creation_timestamp'])} is not a NumericDate",
        )
    email = claims.get("email")
    verified = claims.get("email_verified") is True
    service_account = (
        email.lower() if isinstance(email, str) and verified and _EMAIL.fullmatch(email) else None
    )
    return GceInstance(
        project_id=values["project_id"],
        project_number=values["project_number"],
        zone=values["zone"],
        instance_id=values["instance_id"],
        instance_name=values["instance_name"],
        created_at=created,
        service_account=service_account,
    )
