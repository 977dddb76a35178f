"""Root rotation: the ``prepared`` and ``retiring`` states, when each root was activated,
and the optional cross-certificate by which the previous root vouches for a new one.

A root is ``prepared`` (published in the trust bundle, not yet signing), ``active`` (signs
new intermediates), ``retiring`` (replaced, still published while certificates chained to
it are unexpired) or ``retired`` (no longer published). At most one root is prepared, as
at most one is active; the partial unique index is the backstop for the rule the store
checks under its lock. Both new columns are NULL for roots recorded before this revision.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("roots") as batch:
        batch.add_column(sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("cross_certificate_pem", sa.Text(), nullable=True))
    op.create_index(
        "uq_roots_one_prepared",
        "roots",
        ["state"],
        unique=True,
        sqlite_where=sa.text("state = 'prepared'"),
        postgresql_where=sa.text("state = 'prepared'"),
    )


def downgrade() -> None:
    op.drop_index("uq_roots_one_prepared", table_name="roots")
    with op.batch_alter_table("roots") as batch:
        batch.drop_column("cross_certificate_pem")
        batch.drop_column("activated_at")
