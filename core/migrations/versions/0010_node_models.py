"""The models a provider lets its node serve (`models = [...]` in its provider.toml), bound
with the node: a JSON list of catalog model ids, empty for any model that fits
(cluster.supply).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("provider_nodes") as batch:
        batch.add_column(sa.Column("models", sa.Text(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("provider_nodes") as batch:
        batch.drop_column("models")
