from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from billing import accounts, connect, earnings, ledger
from billing.admission import Admission, Admitted
from billing.meter import UsageMeter
from billing.payouts import IsoWeek, PayoutError, run_due, run_payouts
from billing.plans import Plans
from cluster import registry
from core.schema import (
    AccountFlag,
    LedgerTransfer,
    Payout,
    Provider,
    ProviderReview,
    StripeMovement,
    utcnow,
)
from kernel.money import NUSD_PER_CENT as CENT
from tests.billing.conftest import IN, MODEL, OUT, USD
from tests.billing.payments_harness import Harness

NOW = datetime.now(UTC)
WEEK = IsoWeek.of(NOW)
AFTER = WEEK.end + timedelta(minutes=1)  # Monday 00:01 UTC after this week
# provider A earns 95% of (3 input + 6M output tokens) = $11.40 and 2,850 nUSD
A_SHARE = (3 * IN + 6_000_000 * OUT) * 95 // 100


@dataclass
class World:
    h: Harness
    a: str  # above $10, payouts enabled
    b: str  # below $10, same owner
    c: str  # above $10, owner never onboarded
    acct: str  # the Connect account of A and B's owner


async def earn(adm: Admission, key: str, rid: str, provider: str, prompt: int, out: int) -> None:
    result = await adm.admit(
        api_key=key,
        request_id=rid,
        model=MODEL,
        prompt_tokens=prompt,
        max_tokens=out,
        customer_tag=None,
    )
    assert isinstance(result, Admitted)
    await adm.settle(
        request_id=rid, prompt_tokens=prompt, completion_tokens=out, provider_id=provider
    )


@pytest.fixture
async def world(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> World:
    h = Harness(engine, r, plans)
    h.fake.available_cents = 100_000
    owner, other = h.account(), h.account()
    a, b, c = h.provider(owner, "prv_a"), h.provider(owner, "prv_b"), h.provider(other, "prv_c")
    link = connect.onboarding_link(engine, h.client, h.settings, account_id=owner)
    assert h.deliver("account.updated", h.fake.onboard(link.stripe_account_id)).outcome == (
        "applied"
    )
    customer = h.account("paid")
    accounts.grant_credits(engine, r, account_id=customer, amount_nusd=100 * USD)
    key = accounts.create_key(engine, r, account_id=customer).key
    assert key is not None
    await earn(admission, key, "r-a", a, 3, 6_000_000)
    await earn(admission, key, "r-b", b, 0, 500_000)  # $0.95
    await earn(admission, key, "r-c", c, 0, 6_000_000)
    meter.drain_all()
    return World(h, a, b, c, link.stripe_account_id)


def payable(engine: Engine, provider: str) -> int:
    with Session(engine) as session:
        return ledger.balance(session, ledger.provider_payable(provider))


def statuses(report) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {item.provider_id: item.status for item in report.items}


def test_iso_weeks() -> None:
    week = IsoWeek.parse("2026-W03")
    assert week.start == datetime(2026, 1, 12, tzinfo=UTC)
    assert week.end == datetime(2026, 1, 19, tzinfo=UTC) and str(week) == "2026-W03"
    assert IsoWeek.last_completed(datetime(2026, 1, 19, 0, 0, 1, tzinfo=UTC)) == week
    assert IsoWeek.last_completed(datetime(2026, 1, 18, 23, 59, tzinfo=UTC)) == IsoWeek(2026, 2)
    for bad in ("2026-3", "2026-W54", "W03"):
        with pytest.raises(PayoutError):
            IsoWeek.parse(bad)


def test_a_week_pays_those_above_ten_dollars_and_carries_cents(world: World) -> None:
    h = world.h
    report = run_payouts(h.engine, h.client, week=WEEK, now=AFTER)
    assert report.ok
    assert statuses(report) == {
        world.a: "paid",
        world.b: "below_minimum",
        world.c: "no_payout_account",
    }
    paid = next(i for i in report.items if i.provider_id == world.a)
    assert paid.amount_cents == A_SHARE // CENT == 1140 and paid.carried_nusd == 2_850
    [transfer] = h.fake.transfers.values()
    assert transfer["amount"] == 1140 and transfer["destination"] == world.acct
    assert transfer["transfer_group"] == f"payout_{WEEK}" and paid.transfer_id == transfer["id"]
    method, path, _params = next(c for c in h.fake.calls if c[1] == "/v1/transfers")
    assert method == "POST"
    assert f"payout:{world.a}:{WEEK}" in h.fake.idempotent
    assert payable(h.engine, world.a) == 2_850  # the remainder carries over
    assert payable(h.engine, world.b) == 500_000 * OUT * 95 // 100
    assert payable(h.engine, world.c) == 6_000_000 * OUT * 95 // 100
    with Session(h.engine) as session:
        pending = ledger.balance(session, earnings.payouts_pending(world.a))
        kinds = set(session.scalars(select(LedgerTransfer.kind)))
        moved = session.scalar(select(StripeMovement).where(StripeMovement.kind == "transfer"))
    assert pending == 0 and {"payout_pending", "payout_post"} <= kinds
    assert moved is not None and moved.clearing_nusd == 1140 * CENT


def test_rerunning_a_week_never_pays_twice(world: World) -> None:
    h = world.h
    run_payouts(h.engine, h.client, week=WEEK, now=AFTER)
    again = run_payouts(h.engine, h.client, week=WEEK, now=AFTER + timedelta(hours=1))
    assert statuses(again)[world.a] == "already_paid"
    assert len(h.fake.transfers) == 1 and payable(h.engine, world.a) == 2_850
    assert h.fake.available_cents == 100_000 - 1140


def test_a_refused_transfer_stays_payable_and_is_retried(world: World) -> None:
    h = world.h
    h.fake.available_cents = 500  # the platform's balance cannot cover $11.40
    report = run_payouts(h.engine, h.client, week=WEEK, now=AFTER)
    assert not report.ok and report.to_json()["failed"] == [world.a]
    failed = next(i for i in report.items if i.provider_id == world.a)
    assert failed.status == "failed" and "balance_insufficient" in (failed.error or "")
    assert payable(h.engine, world.a) == A_SHARE and h.fake.transfers == {}
    with Session(h.engine) as session:
        row = session.scalar(select(Payout).where(Payout.provider_id == world.a))
        assert row is not None and row.status == "failed" and row.attempt == 1

    h.fake.available_cents = 100_000  # funds arrive; the rerun tries again, with a new key
    retry = run_payouts(h.engine, h.client, week=WEEK, now=AFTER + timedelta(hours=2))
    assert retry.ok and statuses(retry)[world.a] == "paid"
    assert f"payout:{world.a}:{WEEK}:2" in h.fake.idempotent
    assert payable(h.engine, world.a) == 2_850 and len(h.fake.transfers) == 1


def test_a_disabled_destination_is_reported(world: World) -> None:
    h = world.h
    h.fake.onboard(world.acct, enabled=False)  # Stripe disabled it; no webhook seen yet
    report = run_payouts(h.engine, h.client, week=WEEK, now=AFTER)
    failed = next(i for i in report.items if i.provider_id == world.a)
    assert failed.status == "failed"
    assert "insufficient_capabilities_for_transfer" in (failed.error or "")
    assert payable(h.engine, world.a) == A_SHARE
    # the webhook arrives: next time the provider is skipped, not refused
    h.deliver("account.updated", h.fake.accounts[world.acct])
    report = run_payouts(h.engine, h.client, week=WEEK, now=AFTER)
    assert statuses(report)[world.a] == "payouts_disabled"


def test_an_unanswered_transfer_is_asked_again_with_the_same_key(world: World) -> None:
    h = world.h
    h.fake.lose_next_response = True  # Stripe made the transfer; the answer got lost
    report = run_payouts(h.engine, h.client, week=WEEK, now=AFTER)
    assert not report.ok and statuses(report)[world.a] == "pending_retry"
    assert payable(h.engine, world.a) == 2_850  # the amount waits in payouts-pending
    retry = run_payouts(h.engine, h.client, week=WEEK, now=AFTER)
    assert retry.ok and statuses(retry)[world.a] == "paid"
    assert len(h.fake.transfers) == 1 and h.fake.available_cents == 100_000 - 1140
    with Session(h.engine) as session:
        assert ledger.balance(session, earnings.payouts_pending(world.a)) == 0


def test_dry_run_and_unfinished_weeks(world: World) -> None:
    h = world.h
    dry = run_payouts(h.engine, None, week=WEEK, now=AFTER, dry_run=True)
    assert statuses(dry)[world.a] == "would_pay" and dry.to_json()["paid_cents"] == 1140
    assert h.fake.transfers == {} and payable(h.engine, world.a) == A_SHARE
    with pytest.raises(PayoutError):
        run_payouts(h.engine, h.client, week=WEEK, now=NOW)
    with pytest.raises(PayoutError):
        run_payouts(h.engine, None, week=WEEK, now=AFTER)


def test_earnings_after_the_week_wait_for_the_next(world: World) -> None:
    h = world.h
    # the week before this one: nothing of this week's earnings is due for it
    before = IsoWeek.of(NOW - timedelta(days=7))
    report = run_payouts(h.engine, h.client, week=before, now=AFTER)
    assert world.a not in {i.provider_id for i in report.items if i.status == "paid"}
    assert h.fake.transfers == {}


def test_the_schedule_runs_each_week_once(world: World) -> None:
    h = world.h
    first = run_due(h.engine, h.client, now=AFTER)
    assert first is not None and first.week == str(WEEK)
    assert run_due(h.engine, h.client, now=AFTER + timedelta(hours=3)) is None
    assert len(h.fake.transfers) == 1


def owner_of(engine: Engine, provider_id: str) -> int:
    with Session(engine) as session:
        provider = session.get(Provider, provider_id)
        assert provider is not None
        return provider.account_id


async def test_usage_by_the_providers_own_account_is_never_paid_out(
    world: World, engine: Engine, r: redis.Redis, admission: Admission, meter: UsageMeter
) -> None:
    h = world.h
    owner = owner_of(engine, world.a)  # its signup credits, spent on its own GPU
    key = accounts.create_key(engine, r, account_id=owner).key
    assert key is not None
    await earn(admission, key, "r-self", world.a, 0, 150_000)  # $0.30, within the free cap
    meter.drain_all()
    own = 150_000 * OUT * 95 // 100
    assert payable(engine, world.a) == A_SHARE + own
    report = run_payouts(h.engine, h.client, week=WEEK, now=AFTER)
    paid = next(i for i in report.items if i.provider_id == world.a)
    assert paid.status == "paid" and paid.amount_cents == A_SHARE // CENT == 1140
    assert paid.withheld_nusd == own and paid.carried_nusd == 2_850 + own
    [transfer] = h.fake.transfers.values()
    assert transfer["amount"] == 1140
    assert payable(engine, world.a) == 2_850 + own  # the owner's own share stays, unpaid
    # the next week: nothing new earned, the withheld share is still not paid
    later = run_payouts(h.engine, h.client, week=IsoWeek.of(AFTER), now=AFTER + timedelta(7))
    assert all(i.status != "paid" for i in later.items) and len(h.fake.transfers) == 1


async def test_payouts_are_held_while_the_owner_has_a_refund_of_credits_it_spent(
    world: World, engine: Engine, r: redis.Redis, admission: Admission, meter: UsageMeter
) -> None:
    h = world.h
    owner = owner_of(engine, world.a)
    cs = h.buy(owner, "solo")  # $10 + $50
    accounts.set_limits(engine, r, account_id=owner, tokens_per_day=None)
    key = accounts.create_key(engine, r, account_id=owner).key
    assert key is not None
    await earn(admission, key, "r-spent", world.c, 0, 25_000_000)  # $50, on another's GPU
    meter.drain_all()
    assert h.deliver("charge.refunded", h.fake.refund(cs, 5000)).outcome == "flagged"
    report = run_payouts(h.engine, h.client, week=WEEK, now=AFTER)
    held = next(i for i in report.items if i.provider_id == world.a)
    assert held.status == "held" and held.amount_cents == 0
    assert "a refund of credits it had spent" in (held.error or "")
    assert h.fake.transfers == {} and payable(engine, world.a) == A_SHARE
    with Session(engine) as session, session.begin():  # an operator resolves the flag
        for flag in session.scalars(select(AccountFlag).where(AccountFlag.account_id == owner)):
            flag.resolved_at = utcnow()
    again = run_payouts(h.engine, h.client, week=WEEK, now=AFTER + timedelta(hours=1))
    assert statuses(again)[world.a] == "paid" and len(h.fake.transfers) == 1


def test_payouts_are_held_while_a_dispute_of_the_owner_is_open(world: World) -> None:
    h = world.h
    owner = owner_of(h.engine, world.a)
    cs = h.buy(owner, "solo")
    dispute = h.fake.dispute(cs)  # of credits not spent: all clawed back, but still open
    assert h.deliver("charge.dispute.created", dispute).outcome == "applied"
    report = run_payouts(h.engine, h.client, week=WEEK, now=AFTER)
    held = next(i for i in report.items if i.provider_id == world.a)
    assert held.status == "held" and "an open dispute" in (held.error or "")
    assert h.fake.transfers == {} and payable(h.engine, world.a) == A_SHARE
    assert h.deliver("charge.dispute.closed", {**dispute, "status": "won"}).outcome == "applied"
    again = run_payouts(h.engine, h.client, week=WEEK, now=AFTER + timedelta(hours=1))
    assert statuses(again)[world.a] == "paid" and len(h.fake.transfers) == 1


def test_a_suspended_providers_earnings_are_held_until_it_is_approved_again(world: World) -> None:
    """Suspending a provider (it served badly, or is under investigation) holds what it
    earned: the operator decides before any of it leaves through Stripe."""
    h = world.h
    registry.review(h.engine, world.a, ProviderReview.suspended, note="under review")
    report = run_payouts(h.engine, h.client, week=WEEK, now=AFTER)
    held = next(i for i in report.items if i.provider_id == world.a)
    assert held.status == "held" and held.error == "held: the provider is suspended"
    assert world.a not in h.fake.transfers and payable(h.engine, world.a) == A_SHARE
    registry.review(h.engine, world.a, ProviderReview.approved)
    again = run_payouts(h.engine, h.client, week=WEEK, now=AFTER + timedelta(hours=1))
    assert statuses(again)[world.a] == "paid"
