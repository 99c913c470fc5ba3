import pytest
import redis
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from billing import accounts as svc
from billing.db import alembic_config, current_revision, migrate
from billing.plans import Plans
from billing.schema import Base, UsageEvent


def test_migration_matches_the_models_and_is_idempotent(engine: Engine) -> None:
    migrate(engine)  # a second run changes nothing
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None and current_revision(engine) == head
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def _usage_row(account_id: int) -> UsageEvent:
    return UsageEvent(
        request_id="req-1",
        account_id=account_id,
        key_id=None,
        customer_tag=None,
        model="m",
        provider_id="p",
        prompt_tokens=1,
        completion_tokens=1,
        input_nusd_per_token=1,
        output_nusd_per_token=1,
        cost_nusd=2,
        provider_share_nusd=1,
        platform_share_nusd=1,
        outcome="settled",
        usage_day="2025-01-01",
        created_at_ms=0,
        settled_at_ms=0,
        prev_hash="0" * 64,
        row_hash="f" * 64,
    )


@pytest.fixture
def populated(engine: Engine, r: redis.Redis, plans: Plans) -> Engine:
    account = svc.create_account(engine, r, plans, email="t@example.com")  # a ledger transfer
    with Session(engine) as session, session.begin():
        session.add(_usage_row(account.id))
    return engine


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE usage_events SET completion_tokens = 0",
        "DELETE FROM usage_events",
        "UPDATE ledger_transfers SET memo = 'x'",
        "DELETE FROM ledger_transfers",
        "UPDATE ledger_entries SET amount = amount * 2",
        "DELETE FROM ledger_entries",
    ],
)
def test_append_only_tables_refuse_changes(populated: Engine, statement: str) -> None:
    table = statement.split()[1] if statement.startswith("UPDATE") else statement.split()[2]
    with pytest.raises(DBAPIError, match="append-only"):
        with populated.begin() as conn:
            conn.execute(text(statement))
    with populated.connect() as conn:
        assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() > 0


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # no TRUNCATE in SQLite
@pytest.mark.parametrize("table", ["usage_events", "ledger_transfers", "ledger_entries"])
def test_postgres_refuses_truncate(populated: Engine, table: str) -> None:
    assert populated.dialect.name == "postgresql"
    with pytest.raises(DBAPIError, match="append-only"):
        with populated.begin() as conn:
            conn.execute(text(f"TRUNCATE {table} CASCADE"))
    with populated.connect() as conn:
        assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() > 0


def test_usage_rows_can_still_be_appended(populated: Engine) -> None:
    with populated.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO usage_events (request_id, account_id, model, provider_id, "
                "prompt_tokens, completion_tokens, input_nusd_per_token, output_nusd_per_token,"
                " cost_nusd, provider_share_nusd, platform_share_nusd, outcome, usage_day, "
                "created_at_ms, settled_at_ms, prev_hash, row_hash) SELECT 'req-2', account_id,"
                " model, provider_id, 0, 0, 0, 0, 0, 0, 0, 'reaped', usage_day, 0, 0, row_hash,"
                " 'e' || substr(row_hash, 2) FROM usage_events"
            )
        )
        assert conn.execute(text("SELECT count(*) FROM usage_events")).scalar_one() == 2
