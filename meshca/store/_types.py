"""Column types shared by the tables and the migrations.

SQLite has no timezone-aware timestamp: it stores text and hands back naive datetimes.
:class:`UTCDateTime` makes every backend behave like PostgreSQL's ``timestamptz``: it
refuses naive datetimes on the way in (an ambiguous time in a CA ledger is a bug), stores
UTC, and always returns aware UTC datetimes, so the hash chain sees the same value that
was hashed at append time.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


def to_utc(value: datetime, *, field: str = "datetime") -> datetime:
    """Return ``value`` in UTC; raise ValueError for a naive datetime."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{field} must be timezone-aware (got naive {value.isoformat()})")
    return value.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back as an aware UTC datetime."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        utc = to_utc(value)
        # SQLite's DATETIME text format has no offset; store the UTC wall time.
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
