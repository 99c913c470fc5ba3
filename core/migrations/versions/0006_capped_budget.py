"""Whether a purchase's buyer chose a capped budget (the bundle's daily cap) at checkout.

Purchases before this revision applied the bundle's cap to every buyer; they are recorded as
capped, which is what they did.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stripe_payments") as batch:
        batch.add_column(sa.Column("capped_budget", sa.Boolean(), nullable=True))
    op.execute("UPDATE stripe_payments SET capped_budget = TRUE")
    with op.batch_alter_table("stripe_payments") as batch:
        batch.alter_column("capped_budget", existing_type=sa.Boolean(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("stripe_payments") as batch:
        batch.drop_column("capped_budget")
