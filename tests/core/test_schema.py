from datetime import UTC, datetime, timedelta, timezone

import pytest
import redis
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import DateTime, Engine, select, text
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.orm import Session

from billing import accounts as svc
from billing.plans import Plans
from core.db import alembic_config, current_revision, make_engine, migrate
from core.schema import Account, Base, UsageEvent, UtcDateTime
from tests.billing.conftest import POSTGRES_URL


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


def test_every_moment_column_is_utc() -> None:
    moments = [
        f"{table.name}.{column.name}"
        for table in Base.metadata.tables.values()
        for column in table.columns
        if isinstance(column.type, DateTime | UtcDateTime)
    ]
    assert len(moments) > 20
    assert [m for m in moments if not isinstance(_column(m).type, UtcDateTime)] == []


def _column(name: str) -> object:
    table, column = name.split(".")
    return Base.metadata.tables[table].columns[column]


def test_moments_read_back_aware_utc_and_naive_ones_are_refused(engine: Engine) -> None:
    """SQLite keeps no zone: without UtcDateTime this reads back naive (and PostgreSQL in the
    server's zone); a moment in another zone is stored as the same instant."""
    east = datetime(2026, 11, 24, 3, 30, tzinfo=timezone(timedelta(hours=5)))
    with Session(engine) as session, session.begin():
        session.add(Account(email="tz@example.com", plan="free", created_at=east))
    with Session(engine) as session:
        stored = session.scalars(select(Account.created_at)).one()
        later = session.scalars(
            select(Account.id).where(Account.created_at > datetime(2026, 11, 23, 22, tzinfo=UTC))
        ).all()
    assert stored == datetime(2026, 11, 23, 22, 30, tzinfo=UTC) and stored.tzinfo is UTC
    assert len(later) == 1
    with pytest.raises(StatementError, match="naive datetime"):
        with Session(engine) as session, session.begin():
            session.add(Account(email="naive@example.com", plan="free", created_at=datetime.now()))


def test_postgres_sessions_run_without_jit_or_parallel_workers() -> None:
    """Every session of the platform's PostgreSQL engine, pooled or new, has JIT compilation
    and parallel workers off (core.db: a compiled plan cost a short indexed read 70 ms in
    bench/history.py, and once compiled, two workers took it from 0.8 to 6.5 ms)."""
    engine = make_engine(POSTGRES_URL)
    try:
        with engine.connect() as first, engine.connect() as second:
            for session in (first, second):
                assert session.exec_driver_sql("SHOW jit").scalar() == "off"
                workers = session.exec_driver_sql("SHOW max_parallel_workers_per_gather")
                assert workers.scalar() == "0"
    finally:
        engine.dispose()
