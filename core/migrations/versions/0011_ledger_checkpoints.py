"""Ledger verification checkpoints: what a successful `darkgpu admin ledger verify`
established up to a boundary (the last usage row and its hash, the last transfer and entry
covered, the counts) and each ledger account's sum of entries up to it, so that the next
verification starts there (billing.verify). Append-only, like the ledgers.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
APPEND_ONLY = ("ledger_checkpoints", "ledger_checkpoint_sums")


def upgrade() -> None:
    op.create_table(
        "ledger_checkpoints",
        sa.Column("id", Id, nullable=False),
        sa.Column("last_usage_id", sa.BigInteger(), nullable=False),
        sa.Column("last_row_hash", sa.String(64), nullable=False),
        sa.Column("last_transfer_id", sa.BigInteger(), nullable=False),
        sa.Column("last_entry_id", sa.BigInteger(), nullable=False),
        sa.Column("usage_rows", sa.BigInteger(), nullable=False),
        sa.Column("transfers", sa.BigInteger(), nullable=False),
        sa.Column("entries", sa.BigInteger(), nullable=False),
        sa.Column("verified_from", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_checkpoints"),
    )
    op.create_table(
        "ledger_checkpoint_sums",
        sa.Column("checkpoint_id", Id, nullable=False),
        sa.Column("ledger_account_id", Id, nullable=False),
        sa.Column("entries_sum", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "checkpoint_id", "ledger_account_id", name="pk_ledger_checkpoint_sums"
        ),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["ledger_checkpoints.id"],
            name="fk_ledger_checkpoint_sums_checkpoint_id_ledger_checkpoints",
        ),
        sa.ForeignKeyConstraint(
            ["ledger_account_id"],
            ["ledger_accounts.id"],
            name="fk_ledger_checkpoint_sums_ledger_account_id_ledger_accounts",
        ),
    )
    dialect = op.get_bind().dialect.name
    for table in APPEND_ONLY:  # as 0001 does for the ledgers
        if dialect == "sqlite":
            for action in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )
        elif dialect == "postgresql":
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION darkgpu_refuse_change()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION darkgpu_refuse_change()"
            )
        else:  # pragma: no cover - only SQLite and PostgreSQL are supported
            raise NotImplementedError(f"append-only triggers for {dialect}")


def downgrade() -> None:
    op.drop_table("ledger_checkpoint_sums")  # their triggers go with them
    op.drop_table("ledger_checkpoints")
