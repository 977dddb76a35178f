"""Initial schema: roots, intermediates, the issuance ledger and its head row.

Written by hand to run unchanged on SQLite and PostgreSQL. Timestamps are
``timestamp with time zone`` on PostgreSQL and text on SQLite; meshca always writes
UTC (see ``meshca.store._types.UTCDateTime``). The ``ledger_head`` row is created
here, at sequence 0 with the genesis hash, so appends only ever update it.

Revision ID: 0001
Revises:
Create Date: 2024-01-01
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS_HASH = "0" * 64


def _hex(name: str, *, nullable: bool = False) -> sa.Column[str]:
    return sa.Column(name, sa.String(64), nullable=nullable)


def _when(name: str) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "roots",
        sa.Column("id", sa.Integer(), primary_key=True),
        _hex("fingerprint"),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("key_ref", sa.Text(), nullable=False),
        sa.Column("algorithm", sa.String(32), nullable=False),
        sa.Column("certificate_pem", sa.Text(), nullable=False),
        _when("not_before"),
        _when("not_after"),
        sa.Column("state", sa.String(16), nullable=False),
        _when("created_at"),
        sa.UniqueConstraint("fingerprint", name="uq_roots_fingerprint"),
    )
    op.create_index(
        "uq_roots_one_active",
        "roots",
        ["state"],
        unique=True,
        sqlite_where=sa.text("state = 'active'"),
        postgresql_where=sa.text("state = 'active'"),
    )
    op.create_table(
        "intermediates",
        sa.Column("id", sa.Integer(), primary_key=True),
        _hex("fingerprint"),
        sa.Column("serial_hex", sa.String(64), nullable=False),
        sa.Column(
            "root_fingerprint",
            sa.String(64),
            sa.ForeignKey("roots.fingerprint", name="fk_intermediates_root_fingerprint"),
            nullable=False,
        ),
        sa.Column("certificate_pem", sa.Text(), nullable=False),
        _when("not_before"),
        _when("not_after"),
        sa.Column("owner", sa.Text(), nullable=False),
        _when("created_at"),
        sa.UniqueConstraint("fingerprint", name="uq_intermediates_fingerprint"),
    )
    op.create_table(
        "ledger",
        sa.Column("sequence", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("serial_hex", sa.String(64), nullable=False),
        sa.Column("spiffe_id", sa.Text(), nullable=False),
        sa.Column("auth_method", sa.String(64), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.Column("peer_address", sa.Text(), nullable=False),
        _when("not_before"),
        _when("not_after"),
        _hex("intermediate_fingerprint"),
        sa.Column("request_id", sa.Text(), nullable=True),
        _hex("csr_sha256", nullable=True),
        sa.Column("certificate_pem", sa.Text(), nullable=False),
        _when("issued_at"),
        _hex("prev_hash"),
        _hex("row_hash"),
    )
    op.create_index("uq_ledger_request_id", "ledger", ["request_id", "spiffe_id"], unique=True)
    op.create_index("ix_ledger_serial_hex", "ledger", ["serial_hex"])
    head = op.create_table(
        "ledger_head",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
        _hex("last_hash"),
    )
    op.bulk_insert(head, [{"id": 1, "last_sequence": 0, "last_hash": GENESIS_HASH}])


def downgrade() -> None:
    op.drop_table("ledger_head")
    op.drop_index("ix_ledger_serial_hex", table_name="ledger")
    op.drop_index("uq_ledger_request_id", table_name="ledger")
    op.drop_table("ledger")
    op.drop_table("intermediates")
    op.drop_index("uq_roots_one_active", table_name="roots")
    op.drop_table("roots")
