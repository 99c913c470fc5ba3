"""Join tickets and node bindings: a provider's node gets traffic only once the provider has
bound that Ray node id to itself with a one-time ticket, and only as that provider.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "join_tickets",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("ticket_hash", sa.String(64), nullable=False),
        sa.Column(
            "provider_id",
            sa.String(64),
            sa.ForeignKey("providers.id", name="fk_join_tickets_provider_id_providers"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("node_id", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_join_tickets"),
        sa.UniqueConstraint("ticket_hash", name="uq_join_tickets_ticket_hash"),
    )
    op.create_index("ix_join_tickets_provider_id", "join_tickets", ["provider_id"])
    op.create_table(
        "provider_nodes",
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column(
            "provider_id",
            sa.String(64),
            sa.ForeignKey("providers.id", name="fk_provider_nodes_provider_id_providers"),
            nullable=False,
        ),
        sa.Column("bound_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("node_id", name="pk_provider_nodes"),
    )
    op.create_index("ix_provider_nodes_provider_id", "provider_nodes", ["provider_id"])


def downgrade() -> None:
    op.drop_index("ix_provider_nodes_provider_id", "provider_nodes")
    op.drop_table("provider_nodes")
    op.drop_index("ix_join_tickets_provider_id", "join_tickets")
    op.drop_table("join_tickets")
