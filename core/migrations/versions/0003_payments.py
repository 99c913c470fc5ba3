"""Payments: console passwords, Stripe events, purchases and money movements, account flags,
Connect payout accounts, payouts and payout runs.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def _account_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["account_id"], ["accounts.id"], name=f"fk_{table}_account_id_accounts"
    )


def upgrade() -> None:
    op.create_table(
        "account_passwords",
        sa.Column("account_id", Id, nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("account_id", name="pk_account_passwords"),
        _account_fk("account_passwords"),
    )
    op.create_table(
        "stripe_events",
        sa.Column("id", sa.String(255), nullable=False),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("stripe_created", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("detail", sa.String(500), nullable=True),
        sa.Column("received_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_stripe_events"),
    )
    op.create_table(
        "stripe_payments",
        sa.Column("id", Id, nullable=False),
        sa.Column("account_id", Id, nullable=False),
        sa.Column("bundle", sa.String(32), nullable=False),
        sa.Column("checkout_session_id", sa.String(255), nullable=True),
        sa.Column("payment_intent_id", sa.String(255), nullable=True),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("refunded_cents", sa.BigInteger(), nullable=False),
        sa.Column("disputed_cents", sa.BigInteger(), nullable=False),
        sa.Column("clawed_back_nusd", sa.BigInteger(), nullable=False),
        sa.Column("unrecovered_nusd", sa.BigInteger(), nullable=False),
        sa.Column("paid_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_stripe_payments"),
        _account_fk("stripe_payments"),
        sa.UniqueConstraint("checkout_session_id", name="uq_stripe_payments_checkout_session_id"),
        sa.UniqueConstraint("payment_intent_id", name="uq_stripe_payments_payment_intent_id"),
        sa.CheckConstraint(
            "amount_cents >= 0 AND refunded_cents >= 0 AND disputed_cents >= 0",
            name="ck_stripe_payments_amounts",
        ),
    )
    op.create_index("ix_stripe_payments_account_id", "stripe_payments", ["account_id"])
    op.create_table(
        "stripe_movements",
        sa.Column("id", Id, nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("stripe_id", sa.String(255), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("clearing_nusd", sa.BigInteger(), nullable=False),
        sa.Column("account_id", Id, nullable=True),
        sa.Column("provider_id", sa.String(64), nullable=True),
        sa.Column("event_id", sa.String(255), nullable=True),
        sa.Column("occurred_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_stripe_movements"),
        _account_fk("stripe_movements"),
        sa.UniqueConstraint("key", name="uq_stripe_movements_key"),
        sa.CheckConstraint("amount_cents > 0", name="ck_stripe_movements_positive"),
    )
    op.create_table(
        "account_flags",
        sa.Column("id", Id, nullable=False),
        sa.Column("account_id", Id, nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("stripe_id", sa.String(255), nullable=False),
        sa.Column("unrecovered_nusd", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("resolved_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_account_flags"),
        _account_fk("account_flags"),
        sa.UniqueConstraint("event_id", name="uq_account_flags_event_id"),
    )
    op.create_index("ix_account_flags_account_id", "account_flags", ["account_id"])
    op.create_table(
        "payout_accounts",
        sa.Column("account_id", Id, nullable=False),
        sa.Column("stripe_account_id", sa.String(255), nullable=False),
        sa.Column("payouts_enabled", sa.Boolean(), nullable=False),
        sa.Column("details_submitted", sa.Boolean(), nullable=False),
        sa.Column("stripe_updated_s", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("account_id", name="pk_payout_accounts"),
        _account_fk("payout_accounts"),
        sa.UniqueConstraint("stripe_account_id", name="uq_payout_accounts_stripe_account_id"),
    )
    op.create_table(
        "payouts",
        sa.Column("id", Id, nullable=False),
        sa.Column("provider_id", sa.String(64), nullable=False),
        sa.Column("week", sa.String(8), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("stripe_account_id", sa.String(255), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("transfer_id", sa.String(255), nullable=True),
        sa.Column("error", sa.String(500), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_payouts"),
        sa.ForeignKeyConstraint(
            ["provider_id"], ["providers.id"], name="fk_payouts_provider_id_providers"
        ),
        sa.UniqueConstraint("provider_id", "week", name="uq_payouts_provider_week"),
        sa.CheckConstraint("amount_cents > 0", name="ck_payouts_positive"),
    )
    op.create_index("ix_payouts_provider_id", "payouts", ["provider_id"])
    op.create_table(
        "payout_runs",
        sa.Column("week", sa.String(8), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("week", name="pk_payout_runs"),
    )


def downgrade() -> None:
    for table in (
        "payout_runs",
        "payouts",
        "payout_accounts",
        "account_flags",
        "stripe_movements",
        "stripe_payments",
        "stripe_events",
        "account_passwords",
    ):
        op.drop_table(table)
