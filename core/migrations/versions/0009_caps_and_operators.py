"""Daily caps the customer sets: its account's own cap, beside the operator's (it can only
lower the cap that applies: the tighter of the two), and a cap per API key. The operator's
own accounts, for the console's operator pages. The hours each provider was online, and the
usage indexes by settlement time and by provider: demand and reputation (cluster.market).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("account_limits") as batch:
        batch.add_column(sa.Column("own_tokens_per_day", sa.BigInteger(), nullable=True))
        batch.create_check_constraint(
            "ck_account_limits_own_tpd", "own_tokens_per_day IS NULL OR own_tokens_per_day >= 0"
        )
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("tokens_per_day", sa.BigInteger(), nullable=True))
        batch.create_check_constraint(
            "ck_api_keys_tpd", "tokens_per_day IS NULL OR tokens_per_day >= 0"
        )
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(
            sa.Column("operator", sa.Boolean(), nullable=False, server_default=sa.false())
        )

    op.create_table(
        "provider_hours",
        sa.Column("provider_id", sa.String(64), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("provider_id", "hour", name="pk_provider_hours"),
    )
    op.create_index("ix_usage_events_settled", "usage_events", ["settled_at_ms"])
    op.create_index(
        "ix_usage_events_provider_settled", "usage_events", ["provider_id", "settled_at_ms"]
    )


def downgrade() -> None:
    op.drop_index("ix_usage_events_provider_settled", "usage_events")
    op.drop_index("ix_usage_events_settled", "usage_events")
    op.drop_table("provider_hours")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("operator")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("tokens_per_day")  # its check constraint goes with it
    with op.batch_alter_table("account_limits") as batch:
        batch.drop_column("own_tokens_per_day")  # its check constraint goes with it
