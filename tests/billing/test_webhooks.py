import json
import time

import pytest
import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing import accounts, connect, ledger, webhooks
from billing.admission import Admission, Admitted
from billing.meter import UsageMeter
from billing.plans import Plans
from core.schema import (
    AccountFlag,
    LedgerTransfer,
    PayoutAccount,
    StripeEvent,
    StripeMovement,
    StripePayment,
)
from kernel.money import NUSD_PER_CENT as CENT
from tests.billing.conftest import MODEL, OUT, USD
from tests.billing.fake_stripe import WEBHOOK_SECRET, signed
from tests.billing.payments_harness import Harness


@pytest.fixture
def h(engine: Engine, r: redis.Redis, plans: Plans) -> Harness:
    return Harness(engine, r, plans)


def count(engine: Engine, model: type, *where: object) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def clearing(engine: Engine) -> int:
    with Session(engine) as session:
        return ledger.balance(session, ledger.PAYMENT_CLEARING)


def stripe_holds(h: Harness) -> int:
    """What the clearing account should say: minus the net of every balance transaction at
    Stripe (charges less Stripe's fees, refunds, disputes and their fees), in nUSD."""
    return -h.fake.net_cents() * CENT


def flags(engine: Engine, account_id: int) -> list[AccountFlag]:
    with Session(engine) as session:
        return list(
            session.scalars(select(AccountFlag).where(AccountFlag.account_id == account_id))
        )


async def spend(admission: Admission, key: str, rid: str, usd: int, *, settle: bool = True) -> None:
    """A request billed `usd` dollars of output tokens (or only reserved, `settle=False`)."""
    tokens = usd * USD // OUT
    result = await admission.admit(
        api_key=key,
        request_id=rid,
        model=MODEL,
        prompt_tokens=0,
        max_tokens=tokens,
        customer_tag=None,
    )
    assert isinstance(result, Admitted) and result.max_tokens == tokens, result
    if settle:
        await admission.settle(
            request_id=rid, prompt_tokens=0, completion_tokens=tokens, provider_id="prv_a"
        )


def test_duplicates_change_nothing(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    aid = h.account()
    cs = h.checkout(aid, "solo")
    payload = h.fake.event("checkout.session.completed", h.fake.pay(cs))
    assert h.deliver_raw(payload).outcome == "applied"
    assert h.deliver_raw(payload).outcome == "duplicate"  # Stripe's retry, signed anew
    assert h.handler.handle(json.loads(payload)).outcome == "duplicate"
    # a concurrent delivery that passed the early check: the event's key refuses it
    monkeypatch.setattr(h.handler, "seen", lambda _id: _id == "never")
    with pytest.raises(IntegrityError):
        h.handler.handle(json.loads(payload))
    monkeypatch.undo()
    # another event about the same paid session: the purchase is granted once
    assert h.deliver("checkout.session.completed", h.fake.sessions[cs]).outcome == (
        "already_fulfilled"
    )
    assert h.balance(aid) == 60 * USD and h.redis_balance(aid) == 60 * USD
    assert count(h.engine, LedgerTransfer, LedgerTransfer.kind == "purchase") == 1
    assert count(h.engine, StripeEvent) == 2
    assert clearing(h.engine) == stripe_holds(h) == -(5000 - 175) * CENT  # net of the fee


@pytest.mark.parametrize(
    "tamper",
    ["wrong_secret", "stale", "body_changed", "no_header", "garbage_header", "future"],
)
def test_bad_or_stale_signature_is_refused_and_changes_nothing(h: Harness, tamper: str) -> None:
    aid = h.account()
    cs = h.checkout(aid, "solo")
    payload = h.fake.event("checkout.session.completed", h.fake.pay(cs))
    header: str | None = signed(payload)
    body = payload
    if tamper == "wrong_secret":
        header = signed(payload, "whsec_someone_else")
    elif tamper == "stale":
        header = signed(payload, timestamp=int(time.time()) - 3600)
    elif tamper == "future":
        header = signed(payload, timestamp=int(time.time()) + 3600)
    elif tamper == "body_changed":
        body = payload.replace('"amount_total": 5000', '"amount_total": 500000')
        assert body != payload
    elif tamper == "no_header":
        header = None
    else:
        header = "t=abc,v0=123"
    with pytest.raises(webhooks.BadSignature):
        webhooks.verify(body.encode(), header, WEBHOOK_SECRET)
    assert count(h.engine, StripeEvent) == 0
    assert h.balance(aid) == 10 * USD and h.redis_balance(aid) == 10 * USD


def test_a_rotated_secret_passes_with_any_v1(h: Harness) -> None:
    payload = h.fake.event("customer.created", {"id": "cus_1", "object": "customer"})
    old = signed(payload, "whsec_old")
    new = signed(payload)
    header = old + "," + new.split(",", 1)[1]
    event = webhooks.verify(payload.encode(), header, WEBHOOK_SECRET)
    assert h.handler.handle(event).outcome == "ignored"  # recorded, not retried forever
    assert count(h.engine, StripeEvent) == 1


def test_refunds_claw_back_cumulatively_in_any_order(h: Harness) -> None:
    aid = h.account()
    cs = h.buy(aid, "solo")  # $10 + $50
    first = h.fake.refund(cs, 2000)
    second = h.fake.refund(cs, 3000)  # cumulative amount_refunded: 5000
    assert second["amount_refunded"] == 5000
    assert h.deliver("charge.refunded", first).outcome == "applied"
    assert h.balance(aid) == 40 * USD and h.redis_balance(aid) == 40 * USD
    assert h.deliver("charge.refunded", second).outcome == "applied"
    assert h.balance(aid) == 10 * USD and h.redis_balance(aid) == 10 * USD
    # the first refund's event delivered again, late: it is older news
    assert h.deliver("charge.refunded", first).outcome == "no_change"
    assert h.balance(aid) == 10 * USD
    assert clearing(h.engine) == stripe_holds(h) == 175 * CENT  # $50 in, $50 out, fee kept
    assert not flags(h.engine, aid)


def test_refund_before_fulfilment_is_applied_after_it(h: Harness) -> None:
    aid = h.account()
    cs = h.checkout(aid, "solo")
    completed = h.fake.event("checkout.session.completed", h.fake.pay(cs))
    refunded = h.fake.refund(cs, 2000)
    assert h.deliver("charge.refunded", refunded).outcome == "deferred"
    # only Stripe's fee on the charge is booked: it was taken, whatever we know of the purchase
    assert h.balance(aid) == 10 * USD and clearing(h.engine) == 175 * CENT
    assert h.deliver_raw(completed).outcome == "applied"
    assert h.balance(aid) == 40 * USD and h.redis_balance(aid) == 40 * USD
    assert clearing(h.engine) == stripe_holds(h) == -(3000 - 175) * CENT
    assert count(h.engine, StripePayment) == 1  # the two records of the purchase merged
    kinds = {m: n for m, n in _movements(h.engine)}
    assert kinds == {"charge": 5000, "refund": 2000, "fee": 175}  # 2.9% + 30¢ of $50


def _movements(engine: Engine) -> list[tuple[str, int]]:
    with Session(engine) as session:
        return [
            (kind, int(cents))
            for kind, cents in session.execute(
                select(StripeMovement.kind, func.sum(StripeMovement.amount_cents)).group_by(
                    StripeMovement.kind
                )
            )
        ]


async def test_refund_after_spending_never_goes_below_zero_and_flags(
    h: Harness, admission: Admission, meter: UsageMeter
) -> None:
    aid = h.account()
    cs = h.buy(aid, "solo")  # $60
    accounts.set_limits(h.engine, h.r, account_id=aid, tokens_per_day=None)
    key = accounts.create_key(h.engine, h.r, account_id=aid).key
    assert key is not None
    await spend(admission, key, "req-spent", 45)  # $15 left
    meter.drain_all()
    assert h.balance(aid) == 15 * USD
    result = h.deliver("charge.refunded", h.fake.refund(cs, 5000))
    assert result.outcome == "flagged"
    assert h.balance(aid) == 0 and h.redis_balance(aid) == 0
    [flag] = flags(h.engine, aid)
    assert flag.reason == "refund_after_spend" and flag.unrecovered_nusd == 35 * USD
    assert clearing(h.engine) == stripe_holds(h)  # the whole refund left Stripe: clearing says so
    with Session(h.engine) as session:
        assert ledger.balance(session, webhooks.PAYMENT_LOSSES) == -35 * USD


async def test_credits_held_by_requests_in_flight_are_not_clawed_back(
    h: Harness, admission: Admission, meter: UsageMeter
) -> None:
    aid = h.account()
    cs = h.buy(aid, "solo")  # $60
    accounts.set_limits(h.engine, h.r, account_id=aid, tokens_per_day=None)
    key = accounts.create_key(h.engine, h.r, account_id=aid).key
    assert key is not None
    await spend(admission, key, "req-inflight", 40, settle=False)  # $40 reserved
    dispute = h.fake.dispute(cs)  # the whole $50
    assert h.deliver("charge.dispute.created", dispute).outcome == "flagged"
    assert h.redis_balance(aid) == 0
    assert h.balance(aid) == 40 * USD  # only the $20 not held was clawed back
    assert sorted(f.reason for f in flags(h.engine, aid)) == ["dispute_after_spend", "dispute_open"]
    [flag] = [f for f in flags(h.engine, aid) if f.reason != "dispute_open"]
    assert flag.reason == "dispute_after_spend" and flag.unrecovered_nusd == 30 * USD
    # the request finishes, using all it reserved: the ledger can still bill it
    await admission.settle(
        request_id="req-inflight",
        prompt_tokens=0,
        completion_tokens=40 * USD // OUT,
        provider_id="prv_a",
    )
    meter.drain_all()
    assert h.balance(aid) == 0 and h.redis_balance(aid) == 0
    assert h.deliver("charge.dispute.created", dispute).outcome == "no_change"


def test_dispute_of_unspent_credits(h: Harness) -> None:
    aid = h.account()
    cs = h.buy(aid, "team")  # $10 + $150
    dispute = h.fake.dispute(cs)
    assert h.deliver("charge.dispute.created", dispute).outcome == "applied"
    assert h.balance(aid) == 10 * USD and h.redis_balance(aid) == 10 * USD
    [opened] = flags(h.engine, aid)  # open until it closes: the account's payouts wait
    assert opened.reason == "dispute_open" and opened.stripe_id == dispute["id"]
    assert opened.resolved_at is None and opened.unrecovered_nusd == 0
    assert clearing(h.engine) == stripe_holds(h) == (15_000 + 1_500 - 14_535) * CENT  # fees too
    closed = h.deliver("charge.dispute.closed", {**dispute, "status": "won"})
    assert closed.outcome == "applied"
    [opened] = flags(h.engine, aid)
    assert opened.resolved_at is not None
    again = h.deliver("charge.dispute.closed", {**dispute, "status": "won"})
    assert again.outcome == "ignored"  # a new event about a dispute already closed


def test_events_for_others_are_recorded_and_ignored(h: Harness) -> None:
    aid = h.account()
    foreign = {
        "id": "cs_test_foreign",
        "object": "checkout.session",
        "payment_status": "paid",
        "amount_total": 999,
        "currency": "usd",
        "metadata": {},
        "payment_intent": "pi_foreign",
    }
    assert h.deliver("checkout.session.completed", foreign).outcome == "ignored"
    charge = {"id": "ch_x", "object": "charge", "amount_refunded": 100, "payment_intent": None}
    assert h.deliver("charge.refunded", charge).outcome == "ignored"
    assert h.balance(aid) == 10 * USD
    assert count(h.engine, StripeEvent, StripeEvent.outcome == "ignored") == 2


def test_account_updated_records_payouts_enabled_newest_wins(h: Harness) -> None:
    owner = h.account()
    h.provider(owner)
    link = connect.onboarding_link(h.engine, h.client, h.settings, account_id=owner)
    assert link.url.startswith("https://connect.stripe.com/") and not link.payouts_enabled
    now = int(time.time())
    disabled = dict(h.fake.accounts[link.stripe_account_id])
    enabled = h.fake.onboard(link.stripe_account_id)
    assert h.deliver("account.updated", enabled, created=now).outcome == "applied"
    assert h.deliver("account.updated", disabled, created=now - 60).outcome == "stale"
    with Session(h.engine) as session:
        row = session.get(PayoutAccount, owner)
        assert row is not None and row.payouts_enabled and row.details_submitted
    again = connect.onboarding_link(h.engine, h.client, h.settings, account_id=owner)
    assert again.stripe_account_id == link.stripe_account_id and again.payouts_enabled
    assert len(h.fake.accounts) == 1
    stranger = {"id": "acct_STRANGER", "object": "account", "payouts_enabled": True}
    assert h.deliver("account.updated", stranger).outcome == "ignored"


def test_onboarding_needs_providers(h: Harness) -> None:
    with pytest.raises(connect.NoProviders):
        connect.onboarding_link(h.engine, h.client, h.settings, account_id=h.account())
    assert h.fake.accounts == {}


def test_redis_lost_before_a_refund_is_rebuilt_first(h: Harness) -> None:
    aid = h.account()
    cs = h.buy(aid, "solo")
    h.r.flushdb()  # Redis restarted empty
    assert h.deliver("charge.refunded", h.fake.refund(cs, 1000)).outcome == "applied"
    assert h.balance(aid) == 50 * USD and h.redis_balance(aid) == 50 * USD
