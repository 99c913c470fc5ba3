"""`ledger.bulk_insert`, the ledger's bulk path (COPY on PostgreSQL, executemany on SQLite),
on both databases: values arrive exactly as given, whatever a hostile consumer put in the text
it controls (its `X-Customer-Id` tag becomes `customer_tag`), and a row the database's rules
refuse fails the whole insert inside the caller's transaction: nothing is written."""

from __future__ import annotations

import pytest
import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from billing import accounts as svc
from billing import chain, ledger
from billing.plans import Plans
from core.schema import LedgerEntry, UsageEvent
from kernel.usage_event import UsageRecord

# COPY's text format gives these a meaning: the NULL marker, the column and row separators,
# the escape character, and a lone backslash at the end
HOSTILE_TAGS = ["\\N", "a\tb", "line\nbreak", "back\\slash", "end\\", "\r", "", "naïve ☃"]


def _event(account_id: int, request_id: str, tag: str | None) -> UsageRecord:
    return UsageRecord(
        request_id=request_id, account_id=account_id, key_id=None, customer_tag=tag,
        model="m", provider_id="p", prompt_tokens=3, completion_tokens=2,
        input_nusd_per_token=10, output_nusd_per_token=20, cost_nusd=70,
        provider_share_nusd=66, platform_share_nusd=4, outcome="settled",
        usage_day="2026-12-02", created_at_ms=1, settled_at_ms=2**40,
        reported_completion_tokens=None,
    )  # fmt: skip


def test_values_arrive_exactly_as_given(engine: Engine, r: redis.Redis, plans: Plans) -> None:
    account = svc.create_account(engine, r, plans, email="bulk@example.com", plan="paid")
    tags: list[str | None] = [*HOSTILE_TAGS, None]
    events = [_event(account.id, f"bulk-{i}", tag) for i, tag in enumerate(tags)]
    rows, prev = [], chain.GENESIS
    for event in events:
        digest = chain.row_hash(prev, event)
        rows.append({**event.row(), "prev_hash": prev, "row_hash": digest})
        prev = digest
    with Session(engine) as session, session.begin():
        ledger.bulk_insert(session, UsageEvent.__table__, rows)  # type: ignore[arg-type]
    with Session(engine) as session:
        stored = session.scalars(
            select(UsageEvent).where(UsageEvent.account_id == account.id).order_by(UsageEvent.id)
        ).all()
    assert [UsageRecord.of(row) for row in stored] == events
    assert [row.customer_tag for row in stored] == tags
    assert all(row.row_hash == chain.row_hash(row.prev_hash, UsageRecord.of(row)) for row in stored)


def test_a_refused_row_writes_nothing(engine: Engine, r: redis.Redis, plans: Plans) -> None:
    account = svc.create_account(engine, r, plans, email="refused@example.com")  # $10 granted
    with Session(engine) as session, session.begin():
        before = session.scalar(select(func.count()).select_from(LedgerEntry))
        [transfer] = session.scalars(select(LedgerEntry.transfer_id).limit(1)).all()
        credits_id = ledger.ensure_account(session, ledger.customer_credits(account.id))
    good = {"transfer_id": transfer, "ledger_account_id": credits_id, "amount": 5,
            "balance_after": 5, "account_version": 99}  # fmt: skip
    with pytest.raises(DBAPIError), Session(engine) as session, session.begin():
        ledger.bulk_insert(
            session,
            LedgerEntry.__table__,  # type: ignore[arg-type]
            [good, {**good, "amount": 0}],  # CHECK (amount <> 0)
        )
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(LedgerEntry)) == before
