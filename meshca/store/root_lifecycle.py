"""Root lifecycle transitions, each checked and applied in one locked write transaction.

``prepared`` -> ``active`` -> ``retiring`` -> ``retired`` (a prepared root that never
signed may also go straight to ``retired``). The caller (:class:`meshca.store.Store`)
opens the write transaction and takes the roots lock first, so two operators running
commands at once are serialised by the database, and a refusal leaves nothing changed:
every refusal is a :class:`RootRefusedError` raised before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from meshca.errors import StoreError
from meshca.store.models import IntermediateRecord, LedgerEntry, RootRecord

MIN_ID_LENGTH = 8
"""A root is named by its fingerprint or a prefix of at least this many hex digits."""


class RootRefusedError(StoreError):
    """A root lifecycle command is refused; ``message`` says why and what to do instead."""

    default_reason = "root_refused"


@dataclass(frozen=True, slots=True)
class UnderRoot:
    """Unexpired leaf certificates chained to one root, per the ledger."""

    count: int
    last_expiry: datetime | None


def _short(root: RootRecord) -> str:
    return root.fingerprint[:16]


def find(session: Session, root_id: str) -> RootRecord:
    """The root a fingerprint (or unique prefix of >= 8 hex digits) names."""
    wanted = root_id.strip().lower().replace(":", "")
    if len(wanted) < MIN_ID_LENGTH or any(c not in "0123456789abcdef" for c in wanted):
        raise RootRefusedError(
            f"root id {root_id!r} is not a fingerprint; give at least {MIN_ID_LENGTH} hex "
            "digits of it, as `meshca admin root status` shows"
        )
    matches = [r for r in session.exec(select(RootRecord)) if r.fingerprint.startswith(wanted)]
    if not matches:
        raise RootRefusedError(
            f"no root has a fingerprint starting {wanted}; `meshca admin root status` lists them"
        )
    if len(matches) > 1:
        raise RootRefusedError(
            f"{len(matches)} roots have fingerprints starting {wanted}; give more digits"
        )
    return matches[0]


def in_state(session: Session, state: str) -> RootRecord | None:
    return session.exec(select(RootRecord).where(RootRecord.state == state)).first()


def under_root(session: Session, fingerprint: str, now: datetime) -> UnderRoot:
    """Count the unexpired leaves issued by intermediates of root ``fingerprint``."""
    statement = (
        select(func.count(), func.max(LedgerEntry.not_after))
        .select_from(LedgerEntry)
        .join(
            IntermediateRecord,
            col(IntermediateRecord.fingerprint) == col(LedgerEntry.intermediate_fingerprint),
        )
        .where(IntermediateRecord.root_fingerprint == fingerprint)
        .where(col(LedgerEntry.not_after) > now)
    )
    count, last = session.exec(statement).one()
    return UnderRoot(count=int(count), last_expiry=last)


def check_prepare(session: Session) -> RootRecord:
    """The active root a new root would succeed; refused without one or with one prepared."""
    active = in_state(session, "active")
    if active is None:
        raise RootRefusedError(
            "no root is active, so there is nothing to rotate from; "
            "`meshca admin root create` makes the first root"
        )
    prepared = in_state(session, "prepared")
    if prepared is not None:
        raise RootRefusedError(
            f"root {_short(prepared)} is already prepared (since "
            f"{prepared.created_at.isoformat()}); activate it with `meshca admin root activate "
            f"{_short(prepared)}`, or drop it with `meshca admin root retire {_short(prepared)}`"
        )
    return active


def activate(
    session: Session, root_id: str, *, now: datetime, propagation: timedelta, force: bool
) -> tuple[RootRecord, RootRecord | None, bool]:
    """Make a prepared root active and the active one retiring.

    Refused until ``propagation`` has passed since the root was prepared (the two-root
    bundle needs that long to reach every relying party) unless ``force``. Returns
    (new, previous, forced): ``forced`` is True when the wait was cut short.
    """
    root = find(session, root_id)
    if root.state == "active":
        raise RootRefusedError(f"root {_short(root)} is already active; nothing to do")
    if root.state != "prepared":
        raise RootRefusedError(
            f"root {_short(root)} is {root.state}; only a prepared root can be activated: "
            "run `meshca admin root prepare` for a new one"
        )
    if root.not_after <= now:
        raise RootRefusedError(
            f"root {_short(root)} expired at {root.not_after.isoformat()}; retire it with "
            f"`meshca admin root retire {_short(root)}` and prepare a new one"
        )
    ready_at = root.created_at + propagation
    forced = now < ready_at
    if forced and not force:
        raise RootRefusedError(
            f"root {_short(root)} was prepared at {root.created_at.isoformat()}; the trust "
            f"bundle holding it needs until {ready_at.isoformat()} to reach every agent and "
            "proxy (root_propagation); run this again then, or add --force if every relying "
            "party already has it"
        )
    previous = in_state(session, "active")
    if previous is not None:
        previous.state = "retiring"
        session.add(previous)
        session.flush()  # the one-active index must never see two
    root.state = "active"
    root.activated_at = now
    session.add(root)
    return root, previous, forced


def retire(
    session: Session, root_id: str, *, now: datetime, force: bool
) -> tuple[RootRecord, UnderRoot]:
    """Take a retiring (or never activated) root out of the trust bundle.

    Refused while the ledger holds unexpired certificates chained to it, unless ``force``.
    Returns the root and what was still under it.
    """
    root = find(session, root_id)
    if root.state == "active":
        raise RootRefusedError(
            f"root {_short(root)} is the active root; prepare and activate its successor "
            "first (`meshca admin root prepare`, then `meshca admin root activate`)"
        )
    if root.state == "retired":
        raise RootRefusedError(f"root {_short(root)} is already retired; nothing to do")
    under = under_root(session, root.fingerprint, now)
    if under.count and not force:
        assert under.last_expiry is not None
        raise RootRefusedError(
            f"{under.count} unexpired certificate(s) chain to root {_short(root)}, the last "
            f"until {under.last_expiry.isoformat()}; peers could no longer verify them once "
            "the root leaves the trust bundle; run this again after that time, or add --force"
        )
    root.state = "retired"
    session.add(root)
    return root, under
