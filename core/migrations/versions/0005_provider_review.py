"""A provider's review by the operator: pending until approved; suspended; revoked.

Providers that exist before this revision were already joining and serving: they are
recorded as approved, so that upgrading does not cut the supply off; new ones start pending.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

REVIEWS = ("pending", "approved", "suspended", "revoked")


def upgrade() -> None:
    with op.batch_alter_table("providers") as batch:
        batch.add_column(sa.Column("review", sa.String(16), nullable=True))
        batch.add_column(sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("review_note", sa.String(500), nullable=True))
    op.execute("UPDATE providers SET review = 'approved'")
    with op.batch_alter_table("providers") as batch:
        batch.alter_column("review", existing_type=sa.String(16), nullable=False)
        batch.create_check_constraint(
            "review", "review IN (" + ", ".join(f"'{r}'" for r in REVIEWS) + ")"
        )


def downgrade() -> None:
    with op.batch_alter_table("providers") as batch:
        batch.drop_constraint("ck_providers_review", type_="check")
        batch.drop_column("review_note")
        batch.drop_column("reviewed_at")
        batch.drop_column("review")
