"""Intermediate liveness: when the owning process last vouched for it, and when it stopped.

Each CA process holds its own intermediate in memory; once the process exits, the
intermediate is no longer in use although its certificate stays valid until notAfter.
``last_seen_at`` is refreshed by the owning process's maintenance loop (every 30 s) and
``retired_at`` is set when the process stops cleanly or replaces the intermediate, so
``meshca admin status`` can tell an intermediate in use from one left behind by a crash.
Both are NULL for intermediates recorded before this revision.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("intermediates") as batch:
        batch.add_column(sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("intermediates") as batch:
        batch.drop_column("retired_at")
        batch.drop_column("last_seen_at")
