"""Join tokens in the database: create, look up, spend once, list, revoke.

A token is known here only by the SHA-256 of its text (:mod:`meshca.authn.join_token`
makes and hashes tokens). Spending is one conditional ``UPDATE ... SET used_at = now
WHERE token_sha256 = ? AND used_at IS NULL AND revoked_at IS NULL AND expires_at > now``:
the database, not the process, decides, so of any number of requests carrying one token,
in any number of replicas sharing the database, exactly one changes the row. The caller
(:class:`meshca.store.Store`) opens the transactions.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection, Table, update
from sqlmodel import Session, col, select

from meshca.errors import StoreError
from meshca.store.models import JoinToken

MIN_ID_LENGTH = 8
"""A token is named (``list``, ``revoke``) by a prefix of at least this many hex digits
of its SHA-256; the token itself is never shown again after ``create``."""


class JoinTokenState(enum.StrEnum):
    """Where a join token stands; only ``unused`` tokens can be spent."""

    UNUSED = "unused"
    USED = "used"
    EXPIRED = "expired"
    REVOKED = "revoked"


def state_of(record: JoinToken, now: datetime) -> JoinTokenState:
    """The token's state at ``now`` (used and revoked win over expired: they say more)."""
    if record.used_at is not None:
        return JoinTokenState.USED
    if record.revoked_at is not None:
        return JoinTokenState.REVOKED
    if record.expires_at <= now:
        return JoinTokenState.EXPIRED
    return JoinTokenState.UNUSED


def token_id(record: JoinToken) -> str:
    """How ``meshca admin join-token list`` names a token: 16 hex digits of its digest."""
    return record.token_sha256[:16]


class JoinTokenRefusedError(StoreError):
    """An admin command on join tokens is refused; ``message`` says why."""

    default_reason = "join_token_refused"


def find(session: Session, digest: str) -> JoinToken | None:
    return session.get(JoinToken, digest)


def spend(conn: Connection, table: Table, digest: str, peer: str, now: datetime) -> bool:
    """Mark an unused, unexpired, unrevoked token used by ``peer``; False if it was not."""
    c = table.c
    statement = (
        update(table)
        .where(c.token_sha256 == digest)
        .where(c.used_at.is_(None))
        .where(c.revoked_at.is_(None))
        .where(c.expires_at > now)
        .values(used_at=now, used_by=peer)
        # RETURNING rather than rowcount, as for used_tokens: one answer on every driver.
        .returning(c.token_sha256)
    )
    return conn.execute(statement).first() is not None


def matching(session: Session, ids: Sequence[str], spiffe_id: str | None) -> list[JoinToken]:
    """The tokens ``ids`` (digest prefixes) name, and those for ``spiffe_id``.

    Every id must name exactly one token; JoinTokenRefusedError says which does not.
    """
    found: dict[str, JoinToken] = {}
    for raw in ids:
        wanted = raw.strip().lower()
        if len(wanted) < MIN_ID_LENGTH or any(ch not in "0123456789abcdef" for ch in wanted):
            raise JoinTokenRefusedError(
                f"join token id {raw[:80]!r} is not an id: give at least {MIN_ID_LENGTH} hex "
                "digits, as `meshca admin join-token list` shows (not the token itself)"
            )
        statement = select(JoinToken).where(col(JoinToken.token_sha256).startswith(wanted))
        rows = list(session.exec(statement.limit(2)))
        if not rows:
            raise JoinTokenRefusedError(
                f"no join token has the id {wanted}; `meshca admin join-token list` shows them"
            )
        if len(rows) > 1:
            raise JoinTokenRefusedError(
                f"several join tokens have ids starting {wanted}; give more digits"
            )
        found[rows[0].token_sha256] = rows[0]
    if spiffe_id is not None:
        statement = select(JoinToken).where(JoinToken.spiffe_id == spiffe_id)
        for row in session.exec(statement):
            found[row.token_sha256] = row
    return list(found.values())


def revoke(
    session: Session, ids: Sequence[str], spiffe_id: str | None, now: datetime
) -> tuple[list[JoinToken], list[JoinToken]]:
    """Revoke the unused tokens named; (revoked, left alone as already used/revoked/expired).

    A token given by id that cannot be revoked any more is reported, not an error: the
    command's aim (the token can no longer be spent) holds either way.
    """
    revoked: list[JoinToken] = []
    skipped: list[JoinToken] = []
    for row in matching(session, ids, spiffe_id):
        if state_of(row, now) is JoinTokenState.UNUSED:
            row.revoked_at = now
            session.add(row)
            revoked.append(row)
        else:
            skipped.append(row)
    return revoked, skipped
