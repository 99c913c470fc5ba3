"""Metering authority and self-service: the engine's own completion count beside the billed
one, usage-report strikes against providers, key expiry, low-balance alerts, account
deletion, and enterprise inquiries.

`usage_events.reported_completion_tokens` is added without a batch copy: on SQLite a batch
rebuilds the table and would drop its append-only triggers; a nullable column needs no copy.
Rows before this revision have NULL there (the ingress billed the engine's report then).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column(
        "usage_events", sa.Column("reported_completion_tokens", sa.BigInteger(), nullable=True)
    )
    op.create_table(
        "usage_strikes",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("provider_id", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("reported_tokens", sa.BigInteger(), nullable=False),
        sa.Column("counted_tokens", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_usage_strikes"),
        sa.UniqueConstraint("request_id", name="uq_usage_strikes_request_id"),
    )
    op.create_index("ix_usage_strikes_provider_id", "usage_strikes", ["provider_id"])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("low_balance_nusd", sa.BigInteger(), nullable=True))
        batch.add_column(
            sa.Column("low_balance_notified_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "enterprise_inquiries",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("company", sa.String(200), nullable=False),
        sa.Column("message", sa.String(4000), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_enterprise_inquiries"),
    )


def downgrade() -> None:
    op.drop_table("enterprise_inquiries")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("low_balance_notified_at")
        batch.drop_column("low_balance_nusd")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("expires_at")
    op.drop_index("ix_usage_strikes_provider_id", "usage_strikes")
    op.drop_table("usage_strikes")
    op.drop_column("usage_events", "reported_completion_tokens")
