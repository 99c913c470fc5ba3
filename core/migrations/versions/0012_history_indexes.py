"""Indexes that keep billing's reads flat as the history grows (issue 13): a provider's
usage by day (billing.earnings.earnings: its rows of the chosen days, not all its rows) and
ledger transfers by moment (billing.earnings.due_for_week: what moved after a week's end).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_usage_events_provider_day", "usage_events", ["provider_id", "usage_day"])
    op.create_index("ix_ledger_transfers_event_at", "ledger_transfers", ["event_at"])


def downgrade() -> None:
    op.drop_index("ix_ledger_transfers_event_at", table_name="ledger_transfers")
    op.drop_index("ix_usage_events_provider_day", table_name="usage_events")
