"""Providers (GPU owners' nodes) and their agent tokens.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "providers",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("account_id", Id, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("x25519_public_key", sa.String(64), nullable=True),
        sa.Column("gpu_name", sa.String(128), nullable=True),
        sa.Column("vram_gb", sa.Float(), nullable=True),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("driver_version", sa.String(32), nullable=True),
        sa.Column("cuda_version", sa.String(16), nullable=True),
        sa.Column("cc_state", sa.String(16), nullable=False),
        sa.Column("trust_tier", sa.String(16), nullable=False),
        sa.Column("cc_evidence", sa.JSON(), nullable=True),
        sa.Column("price_floor_pct", sa.Integer(), nullable=False),
        sa.Column("schedule", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("last_heartbeat_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_providers"),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_providers_account_id_accounts"
        ),
        sa.CheckConstraint(
            "status IN ('online', 'paused', 'draining', 'offline')", name="ck_providers_status"
        ),
        sa.CheckConstraint("trust_tier IN ('basic', 'verified')", name="ck_providers_trust_tier"),
        sa.CheckConstraint(
            "cc_state IN ('unknown', 'unsupported', 'off', 'on', 'devtools')",
            name="ck_providers_cc_state",
        ),
        sa.CheckConstraint(
            "price_floor_pct >= 0 AND price_floor_pct <= 1000", name="ck_providers_price_floor"
        ),
        sa.CheckConstraint("gpu_count >= 0", name="ck_providers_gpu_count"),
    )
    op.create_index("ix_providers_account_id", "providers", ["account_id"])
    op.create_table(
        "provider_tokens",
        sa.Column("id", Id, nullable=False),
        sa.Column("provider_id", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_provider_tokens"),
        sa.ForeignKeyConstraint(
            ["provider_id"], ["providers.id"], name="fk_provider_tokens_provider_id_providers"
        ),
        sa.UniqueConstraint("token_hash", name="uq_provider_tokens_token_hash"),
    )
    op.create_index("ix_provider_tokens_provider_id", "provider_tokens", ["provider_id"])


def downgrade() -> None:
    op.drop_table("provider_tokens")
    op.drop_table("providers")
