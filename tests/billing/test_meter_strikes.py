"""Strikes (billing.strikes), recorded by the meter as it writes usage rows, on a real Redis
and SQLite/PostgreSQL: the settlement carries the ingress's count (billed) and the engine's
report; a report beyond the tolerance strikes the provider, once per request; honest reports
and the platform's own head never do; the registry's terms count the last 24 h."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import redis
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from billing import strikes
from billing.admission import Admission
from billing.meter import UsageMeter
from billing.plans import Plans
from billing.verify import verify_ledger
from cluster import registry
from core.schema import UsageEvent, UsageStrike
from kernel import redis_keys as rk
from kernel.labels import LOCAL_PROVIDER_ID
from tests.billing.conftest import IN, MODEL, OUT, USD, Customer, make_customer


async def served(
    adm: Admission,
    c: Customer,
    rid: str,
    *,
    counted: int,
    reported: int | None,
    provider: str = "prov-bad",
) -> None:
    """One request of 10 prompt tokens settled as the ingress settles it: the completion it
    counted (billed, never above the report) and the engine's report."""
    admitted = await adm.admit(
        api_key=c.key, request_id=rid, model=MODEL, prompt_tokens=10, max_tokens=500,
        customer_tag=None,
    )  # fmt: skip
    assert admitted.__class__.__name__ == "Admitted"
    assert await adm.settle(
        request_id=rid,
        prompt_tokens=10,
        completion_tokens=counted,
        provider_id=provider,
        reported_completion_tokens=reported,
    )


def strike_rows(engine: Engine) -> list[UsageStrike]:
    with Session(engine) as session:
        return list(session.scalars(select(UsageStrike).order_by(UsageStrike.id)))


async def test_an_engine_that_over_reports_is_billed_what_was_delivered_and_struck(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    await served(admission, c, "inflated", counted=20, reported=480)
    assert meter.drain_once() == 1
    with Session(engine) as session:
        row = session.scalars(select(UsageEvent)).one()
    assert (row.completion_tokens, row.reported_completion_tokens) == (20, 480)
    assert row.cost_nusd == 10 * IN + 20 * OUT  # not a nano-dollar for the 460 not delivered
    assert int(r.get(rk.balance(c.account_id))) == USD - row.cost_nusd
    [strike] = strike_rows(engine)
    assert (strike.provider_id, strike.request_id, strike.model) == (
        "prov-bad",
        "inflated",
        MODEL.id,
    )
    assert (strike.reported_tokens, strike.counted_tokens) == (480, 20)
    assert verify_ledger(engine).ok  # the report is in the chain, and the chain holds


async def test_a_replayed_event_is_struck_once(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    await served(admission, c, "inflated", counted=5, reported=300)
    copies = [fields for _id, fields in r.xrange(rk.USAGE_STREAM)]
    meter.drain_once()
    for fields in copies + copies:  # the stream delivers it again, twice
        r.xadd(rk.USAGE_STREAM, fields)
    assert meter.drain_once() == 2
    assert [s.request_id for s in strike_rows(engine)] == ["inflated"]


async def test_honest_reports_and_the_platforms_own_head_are_never_struck(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    """Within the tolerance (the round trip of detokenizing then retokenizing), and where the
    engine's report is below the count (billed at the report), nothing is struck; nor is a
    report from before the ingress counted (none), nor the platform's head (`local`)."""
    c = make_customer(engine, r, plans, usd=5)
    cases = []
    for reported in range(0, 400, 7):
        allowed = strikes.tolerance(reported)
        cases.append((max(0, reported - allowed), reported))  # at the edge of the tolerance
        cases.append((reported + 3, reported))  # the count above the report: billed the report
    for i, (counted, reported) in enumerate(cases):
        await served(admission, c, f"honest-{i}", counted=min(counted, reported), reported=reported)
    await served(admission, c, "unknown", counted=5, reported=None)
    await served(admission, c, "head", counted=5, reported=400, provider=LOCAL_PROVIDER_ID)
    meter.drain_all()
    assert strike_rows(engine) == []
    with Session(engine) as session:
        assert (
            session.scalar(
                select(UsageEvent.reported_completion_tokens).where(
                    UsageEvent.request_id == "unknown"
                )
            )
            is None
        )
    assert verify_ledger(engine).ok


async def test_a_reaped_stream_bills_its_counted_checkpoint_and_keeps_the_report(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    """The ingress died mid-stream: its last checkpoint held its own count of what it had
    delivered and the engine's report so far; the reaper bills the count, the meter strikes
    the report."""
    c = make_customer(engine, r, plans, usd=1)
    admitted = await admission.admit(
        api_key=c.key, request_id="cut", model=MODEL, prompt_tokens=10, max_tokens=500,
        customer_tag=None,
    )  # fmt: skip
    assert admitted.__class__.__name__ == "Admitted"
    assert await admission.checkpoint(
        request_id="cut", prompt_tokens=10, completion_tokens=12, provider_id="prov-bad",
        reported_completion_tokens=450,
    )  # fmt: skip
    assert await admission.reap(now=datetime.now(UTC).timestamp() + 10_000) == 1
    meter.drain_all()
    with Session(engine) as session:
        row = session.scalars(select(UsageEvent)).one()
    assert (row.outcome, row.completion_tokens, row.reported_completion_tokens) == (
        "reaped",
        12,
        450,
    )
    assert row.cost_nusd == 10 * IN + 12 * OUT
    assert [(s.request_id, s.counted_tokens) for s in strike_rows(engine)] == [("cut", 12)]


async def test_the_registry_counts_each_providers_strikes_of_the_last_day(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    bad = registry.create_provider(engine, account_id=c.account_id, name="bad").provider
    good = registry.create_provider(engine, account_id=c.account_id, name="good").provider
    for i in range(3):
        await served(admission, c, f"x-{i}", counted=1, reported=100, provider=bad.id)
    await served(admission, c, "fine", counted=100, reported=100, provider=good.id)
    meter.drain_all()
    terms = registry.provider_terms(engine)
    assert (terms[bad.id].recent_strikes, terms[good.id].recent_strikes) == (3, 0)
    with Session(engine) as session, session.begin():  # one of them two days ago
        session.execute(
            update(UsageStrike)
            .where(UsageStrike.request_id == "x-0")
            .values(created_at=datetime.now(UTC) - timedelta(days=2))
        )
    assert registry.provider_terms(engine)[bad.id].recent_strikes == 2
