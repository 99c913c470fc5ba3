"""Accounts, keys, limits, the double-entry ledger and the append-only usage ledger.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
APPEND_ONLY = ("usage_events", "ledger_transfers", "ledger_entries")
KINDS = (
    "customer_credits",
    "provider_payable",
    "platform_revenue",
    "promotional_grants",
    "payment_clearing",
)


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", Id, nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("plan", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
        sa.UniqueConstraint("email", name="uq_accounts_email"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", Id, nullable=False),
        sa.Column("account_id", Id, nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("name", sa.String(100), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_api_keys_account_id_accounts"
        ),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_index("ix_api_keys_account_id", "api_keys", ["account_id"])
    op.create_index("ix_api_keys_prefix", "api_keys", ["prefix"])
    op.create_table(
        "account_limits",
        sa.Column("account_id", Id, nullable=False),
        sa.Column("requests_per_minute", sa.Integer(), nullable=True),
        sa.Column("tokens_per_day", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("account_id", name="pk_account_limits"),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_account_limits_account_id_accounts"
        ),
        sa.CheckConstraint(
            "requests_per_minute IS NULL OR requests_per_minute > 0", name="ck_account_limits_rpm"
        ),
        sa.CheckConstraint(
            "tokens_per_day IS NULL OR tokens_per_day >= 0", name="ck_account_limits_tpd"
        ),
    )
    op.create_table(
        "customer_caps",
        sa.Column("id", Id, nullable=False),
        sa.Column("account_id", Id, nullable=False),
        sa.Column("customer_tag", sa.String(256), nullable=False),
        sa.Column("tokens_per_day", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_customer_caps"),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_customer_caps_account_id_accounts"
        ),
        sa.UniqueConstraint("account_id", "customer_tag", name="uq_customer_caps_account_tag"),
        sa.CheckConstraint("tokens_per_day >= 0", name="ck_customer_caps_tpd"),
    )
    op.create_table(
        "ledger_accounts",
        sa.Column("id", Id, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("account_id", Id, nullable=True),
        sa.Column("provider_id", sa.String(128), nullable=True),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("allow_negative", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_accounts"),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_ledger_accounts_account_id_accounts"
        ),
        sa.UniqueConstraint("name", name="uq_ledger_accounts_name"),
        sa.CheckConstraint(
            "allow_negative OR balance >= 0", name="ck_ledger_accounts_not_negative"
        ),
        sa.CheckConstraint(
            "kind IN (" + ", ".join(f"'{k}'" for k in KINDS) + ")", name="ck_ledger_accounts_kind"
        ),
    )
    op.create_index("ix_ledger_accounts_account_id", "ledger_accounts", ["account_id"])
    op.create_table(
        "ledger_transfers",
        sa.Column("id", Id, nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("memo", sa.String(500), nullable=True),
        sa.Column("event_at", TS, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_transfers"),
        sa.UniqueConstraint("idempotency_key", name="uq_ledger_transfers_idempotency_key"),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", Id, nullable=False),
        sa.Column("transfer_id", Id, nullable=False),
        sa.Column("ledger_account_id", Id, nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("balance_after", sa.BigInteger(), nullable=False),
        sa.Column("account_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_entries"),
        sa.ForeignKeyConstraint(
            ["transfer_id"],
            ["ledger_transfers.id"],
            name="fk_ledger_entries_transfer_id_ledger_transfers",
        ),
        sa.ForeignKeyConstraint(
            ["ledger_account_id"],
            ["ledger_accounts.id"],
            name="fk_ledger_entries_ledger_account_id_ledger_accounts",
        ),
        sa.CheckConstraint("amount <> 0", name="ck_ledger_entries_nonzero"),
    )
    op.create_index("ix_ledger_entries_transfer_id", "ledger_entries", ["transfer_id"])
    op.create_index("ix_ledger_entries_ledger_account_id", "ledger_entries", ["ledger_account_id"])
    op.create_table(
        "usage_events",
        sa.Column("id", Id, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("account_id", Id, nullable=False),
        sa.Column("key_id", sa.BigInteger(), nullable=True),
        sa.Column("customer_tag", sa.String(256), nullable=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("provider_id", sa.String(128), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("input_nusd_per_token", sa.BigInteger(), nullable=False),
        sa.Column("output_nusd_per_token", sa.BigInteger(), nullable=False),
        sa.Column("cost_nusd", sa.BigInteger(), nullable=False),
        sa.Column("provider_share_nusd", sa.BigInteger(), nullable=False),
        sa.Column("platform_share_nusd", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("usage_day", sa.String(10), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("settled_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("row_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_usage_events"),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_usage_events_account_id_accounts"
        ),
        sa.UniqueConstraint("request_id", name="uq_usage_events_request_id"),
        sa.UniqueConstraint("row_hash", name="uq_usage_events_row_hash"),
        sa.CheckConstraint(
            "prompt_tokens >= 0 AND completion_tokens >= 0 AND cost_nusd >= 0",
            name="ck_usage_events_nonneg",
        ),
        sa.CheckConstraint(
            "provider_share_nusd + platform_share_nusd = cost_nusd", name="ck_usage_events_split"
        ),
    )
    op.create_index(
        "ix_usage_events_account_created", "usage_events", ["account_id", "created_at_ms"]
    )
    op.create_index("ix_usage_events_day", "usage_events", ["usage_day", "account_id"])

    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for table in APPEND_ONLY:
            for action in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )
    elif dialect == "postgresql":
        op.execute(
            """
            CREATE FUNCTION darkgpu_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
                    USING ERRCODE = 'restrict_violation';
            END
            $$
            """
        )
        for table in APPEND_ONLY:
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
    dialect = op.get_bind().dialect.name
    for table in (
        "usage_events",
        "ledger_entries",
        "ledger_transfers",
        "ledger_accounts",
        "customer_caps",
        "account_limits",
        "api_keys",
        "accounts",
    ):
        op.drop_table(table)
    if dialect == "postgresql":
        op.execute("DROP FUNCTION darkgpu_refuse_change()")
