"""`verify_ledger` from its last verified checkpoint (issue 13): a pass writes a checkpoint,
the next run reads only the rows after it, what changes after it (or at its boundary) is
caught, a failed run writes none, and `full` finds what the incremental run trusts. Real
Redis and meter, real SQLite and PostgreSQL."""

from __future__ import annotations

import time

import pytest
import redis
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from billing import chain, ledger
from billing.admission import Admission
from billing.meter import UsageMeter
from billing.plans import Plans
from billing.verify import VerifyResult, verify_ledger
from core.schema import LedgerCheckpoint, LedgerKind, UsageEvent
from kernel.usage_event import UsageRecord
from tests.billing.conftest import MODEL, Customer, make_customer


async def serve(adm: Admission, meter: UsageMeter, c: Customer, ids: range) -> None:
    """Admit, settle and meter one paid request per id."""
    for i in ids:
        admitted = await adm.admit(
            api_key=c.key,
            request_id=f"r{i}",
            model=MODEL,
            prompt_tokens=10,
            max_tokens=50,
            customer_tag=None,
        )
        assert admitted.__class__.__name__ == "Admitted"
        assert await adm.settle(
            request_id=f"r{i}", prompt_tokens=10, completion_tokens=20 + i, provider_id="p1"
        )
    assert meter.drain_all() == len(ids)


def verify(engine: Engine, **kwargs: object) -> VerifyResult:
    """A verification whose checkpoint covers every row already written (no margin)."""
    return verify_ledger(engine, margin_s=0, now=time.time() + 1, **kwargs)  # type: ignore[arg-type]


def checkpoints(engine: Engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(LedgerCheckpoint)) or 0


def usage_id(engine: Engine, request_id: str) -> int:
    with Session(engine) as session:
        found = session.scalar(select(UsageEvent.id).where(UsageEvent.request_id == request_id))
    assert found is not None
    return found


def without_triggers(engine: Engine, statement: str, **params: object) -> None:
    """Change a usage row the way an attacker with owner rights could: past the triggers."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("ALTER TABLE usage_events DISABLE TRIGGER USER"))
            conn.execute(text(statement), params)
            conn.execute(text("ALTER TABLE usage_events ENABLE TRIGGER USER"))
        else:
            conn.execute(text("DROP TRIGGER IF EXISTS usage_events_no_update"))
            conn.execute(text(statement), params)


@pytest.fixture
def customer(engine: Engine, r: redis.Redis, plans: Plans) -> Customer:
    return make_customer(engine, r, plans, usd=1)  # one transfer: the grant


async def test_a_pass_writes_a_checkpoint_and_the_next_reads_only_what_follows(
    engine: Engine, admission: Admission, meter: UsageMeter, customer: Customer
) -> None:
    await serve(admission, meter, customer, range(3))
    first = verify(engine)
    assert first.ok, first.problems
    assert first.full and first.from_checkpoint is None
    assert (first.usage_rows, first.transfers, first.entries) == (3, 4, 2 + 3 * 4)
    written = first.checkpoint
    assert written is not None and written.checkpoint_id is not None
    assert written.last_usage_id == usage_id(engine, "r2")
    assert (written.usage_rows, written.transfers, written.entries) == (3, 4, 14)
    assert sum(written.sums.values()) == 0 and len(written.sums) == 4  # credits, grants, p1, us

    await serve(admission, meter, customer, range(3, 5))
    second = verify(engine)
    assert second.ok, second.problems
    assert not second.full and second.from_checkpoint == written
    assert (second.usage_rows, second.transfers, second.entries) == (2, 2, 8)
    assert second.usage_rows_total == 5
    assert second.checkpoint is not None
    assert (second.checkpoint.usage_rows, second.checkpoint.transfers) == (5, 6)
    assert second.to_json()["from_checkpoint"]["id"] == written.checkpoint_id

    third = verify(engine)
    assert third.ok and (third.usage_rows, third.transfers, third.entries) == (0, 0, 0)
    assert checkpoints(engine) == 3
    full = verify(engine, full=True)
    assert full.ok and full.full and (full.usage_rows, full.transfers) == (5, 6)


async def test_the_boundary_keeps_the_margin_behind_now(
    engine: Engine, admission: Admission, meter: UsageMeter, customer: Customer
) -> None:
    """Rows younger than the margin (a writer's transaction may still be open below them)
    are verified but not covered: the next run reads them again."""
    await serve(admission, meter, customer, range(2))
    fresh = verify_ledger(engine)  # the default margin: everything was written just now
    assert fresh.ok and fresh.checkpoint is not None
    assert (fresh.checkpoint.last_usage_id, fresh.checkpoint.last_transfer_id) == (0, 0)
    assert (fresh.checkpoint.last_entry_id, fresh.checkpoint.sums) == (0, {})
    again = verify_ledger(engine)
    assert again.ok and not again.full and (again.usage_rows, again.transfers) == (2, 3)
    later = verify_ledger(engine, now=time.time() + 600)  # the margin has passed
    assert later.ok and later.checkpoint is not None
    assert (later.checkpoint.usage_rows, later.checkpoint.transfers) == (2, 3)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # SQLite: one writer
def test_a_transfer_committed_late_below_a_newer_one_is_not_skipped(engine: Engine) -> None:
    """Ids commit out of order: a transfer holding a lower id commits after a higher one was
    read. The checkpoint keeps the margin behind both, so the next run reads the late one."""

    def spec(name: str) -> ledger.AccountSpec:
        return ledger.AccountSpec(name, LedgerKind.promotional_grants, True)

    def post(session: Session, key: str, source: str, sink: str) -> int:
        legs = [ledger.Leg(spec(source), spec(sink), 5)]
        transfer_id = ledger.post_transfer(session, idempotency_key=key, kind="t", legs=legs)
        assert transfer_id is not None
        return transfer_id

    with Session(engine) as late:
        late.begin()
        late_id = post(late, "late", "a", "b")  # its id is taken, not committed yet
        with Session(engine) as early, early.begin():
            assert post(early, "early", "c", "d") > late_id
        during = verify_ledger(engine)
        assert during.ok and during.transfers == 1 and during.checkpoint is not None
        assert during.checkpoint.last_transfer_id < late_id
        late.commit()
    after = verify_ledger(engine)
    assert after.ok and after.from_checkpoint == during.checkpoint
    assert after.transfers == 2  # the late one is read


async def test_a_row_changed_after_the_checkpoint_is_caught_and_no_checkpoint_written(
    engine: Engine, admission: Admission, meter: UsageMeter, customer: Customer
) -> None:
    await serve(admission, meter, customer, range(2))
    assert verify(engine).ok
    await serve(admission, meter, customer, range(2, 4))
    without_triggers(
        engine, "UPDATE usage_events SET completion_tokens = 99 WHERE request_id = 'r3'"
    )
    result = verify(engine)
    assert not result.ok and not result.full and result.usage_rows == 2
    assert any("(r3): row_hash does not match" in p for p in result.problems)
    assert any("(r3): cost != tokens" in p for p in result.problems)
    assert result.checkpoint is None and checkpoints(engine) == 1


def _rehash(engine: Engine, request_id: str, **changes: object) -> None:
    """Rewrite a usage row consistently: its fields changed and its own row_hash recomputed
    (the links to it are what can tell)."""
    with Session(engine) as session:
        row = session.scalars(select(UsageEvent).where(UsageEvent.request_id == request_id)).one()
        for name, value in changes.items():
            setattr(row, name, value)
        digest = chain.row_hash(row.prev_hash, UsageRecord.of(row))
        session.expunge(row)
    sets = ", ".join(f"{name} = :{name}" for name in changes)
    without_triggers(
        engine,
        f"UPDATE usage_events SET {sets}, row_hash = :h WHERE request_id = :rid",
        h=digest,
        rid=request_id,
        **changes,
    )


async def test_a_rewritten_boundary_row_is_caught(
    engine: Engine, admission: Admission, meter: UsageMeter, customer: Customer
) -> None:
    """The checkpoint's last row rewritten with a hash of its own: the chain still links to
    it, but it no longer has the checkpoint's hash."""
    await serve(admission, meter, customer, range(2))
    first = verify(engine)
    assert first.ok and first.checkpoint is not None
    assert first.checkpoint.last_usage_id == usage_id(engine, "r1")
    _rehash(engine, "r1", customer_tag="forged")
    result = verify(engine)
    assert not result.ok and result.usage_rows == 0
    assert any("(r1): row_hash is not checkpoint" in p for p in result.problems), result.problems
    assert checkpoints(engine) == 1


async def test_a_broken_link_at_the_boundary_is_caught(
    engine: Engine, admission: Admission, meter: UsageMeter, customer: Customer
) -> None:
    """The first row after the checkpoint made to chain elsewhere (its own hash consistent)."""
    await serve(admission, meter, customer, range(2))
    assert verify(engine).ok
    await serve(admission, meter, customer, range(2, 3))
    _rehash(engine, "r2", prev_hash="f" * 64)
    result = verify(engine)
    assert not result.ok and result.usage_rows == 1
    assert result.problems == [f"usage row {usage_id(engine, 'r2')} (r2): chain broken (prev_hash)"]
    assert checkpoints(engine) == 1


async def test_a_balance_other_than_checkpoint_sum_plus_new_entries_is_caught(
    engine: Engine, admission: Admission, meter: UsageMeter, customer: Customer
) -> None:
    await serve(admission, meter, customer, range(2))
    first = verify(engine)
    assert first.ok and first.checkpoint is not None
    await serve(admission, meter, customer, range(2, 3))
    name = ledger.customer_credits(customer.account_id).name
    with engine.begin() as conn:
        stored = conn.execute(
            text("SELECT id, balance FROM ledger_accounts WHERE name = :n"), {"n": name}
        ).one()
        conn.execute(
            text("UPDATE ledger_accounts SET balance = balance + 7 WHERE name = :n"), {"n": name}
        )
    result = verify(engine)
    assert not result.ok and not result.full
    assert result.problems == [
        f"ledger account {name}: balance {stored.balance + 7} != entries {stored.balance}"
    ]
    assert first.checkpoint.sums[stored.id] > stored.balance  # the sum moved on since
    assert checkpoints(engine) == 1


async def test_full_finds_a_change_before_the_checkpoint_that_an_incremental_run_trusts(
    engine: Engine, admission: Admission, meter: UsageMeter, customer: Customer
) -> None:
    await serve(admission, meter, customer, range(3))
    assert verify(engine).ok
    without_triggers(
        engine, "UPDATE usage_events SET completion_tokens = 99 WHERE request_id = 'r0'"
    )
    await serve(admission, meter, customer, range(3, 4))
    incremental = verify(engine)
    assert incremental.ok and incremental.usage_rows == 1  # r0 lies before its checkpoint
    full = verify(engine, full=True)
    assert not full.ok and full.full and full.usage_rows == 4
    assert any("(r0): row_hash does not match" in p for p in full.problems)
    assert full.checkpoint is None and checkpoints(engine) == 2
