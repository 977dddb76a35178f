"""Node identity in the ledger: which node agent asked for a workload's certificate, and
on which Kubernetes node.

Two nullable columns on ``ledger``: ``agent_spiffe_id`` (the agent's own SPIFFE ID, when
it asked on a workload's behalf) and ``node_name`` (the node it runs on). Rows with
either set are hashed in ledger format v2 (see ``meshca.store.chain``); existing rows
keep both null and verify as before.

Revision ID: 0006_node_identity
Revises: 0005_join_tokens
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_node_identity"
down_revision: str | None = "0005_join_tokens"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("ledger") as batch:
        batch.add_column(sa.Column("agent_spiffe_id", sa.Text(), nullable=True))
        batch.add_column(sa.Column("node_name", sa.String(253), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ledger") as batch:
        batch.drop_column("node_name")
        batch.drop_column("agent_spiffe_id")
