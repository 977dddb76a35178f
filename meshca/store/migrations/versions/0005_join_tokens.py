"""Join tokens: single-use secrets an operator hands to a machine outside Kubernetes and
Google Cloud so that its agent can get its first certificate.

Only the SHA-256 of each token is kept (the token is 128 bits or more from ``secrets``,
so a plain digest cannot be searched back to it), with the SPIFFE ID it grants, when it
expires, who created it, and when and by which peer it was used or when it was revoked.
Using a token is one conditional ``UPDATE ... WHERE used_at IS NULL``, so of two replicas
presented the same token exactly one succeeds.

Revision ID: 0005_join_tokens
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_join_tokens"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "join_tokens",
        sa.Column("token_sha256", sa.String(64), primary_key=True),
        sa.Column("spiffe_id", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("used_by", sa.Text(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_join_tokens_expires_at", "join_tokens", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_join_tokens_expires_at", table_name="join_tokens")
    op.drop_table("join_tokens")
