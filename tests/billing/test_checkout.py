import pytest
import redis
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from billing.checkout import CheckoutError, create_checkout
from billing.plans import Plans
from core.schema import Account, PaymentStatus, StripePayment
from kernel import redis_keys as rk
from tests.billing.conftest import USD
from tests.billing.payments_harness import Harness


@pytest.fixture
def h(engine: Engine, r: redis.Redis, plans: Plans) -> Harness:
    return Harness(engine, r, plans)


def payment(engine: Engine, session_id: str) -> StripePayment:
    with Session(engine) as session:
        row = session.scalar(
            select(StripePayment).where(StripePayment.checkout_session_id == session_id)
        )
        assert row is not None
        return row


def plan_of(engine: Engine, account_id: int) -> str:
    with Session(engine) as session:
        account = session.get(Account, account_id)
        assert account is not None
        return account.plan


def test_checkout_session_carries_account_and_bundle(h: Harness) -> None:
    aid = h.account()
    result = create_checkout(h.engine, h.client, h.plans, h.settings, account_id=aid, bundle="team")
    assert result.id.startswith("cs_test_") and result.url.startswith("https://checkout.stripe")
    assert result.to_json()["amount_usd"] == "150"
    method, path, params = h.fake.calls[-1]
    assert (method, path) == ("POST", "/v1/checkout/sessions")
    assert params["mode"] == "payment"
    meta = {"darkgpu_account_id": str(aid), "darkgpu_bundle": "team"}
    assert params["metadata"] == meta
    assert params["payment_intent_data"]["metadata"] == meta
    assert params["client_reference_id"] == str(aid)
    price = params["line_items"][0]["price_data"]
    assert (price["unit_amount"], price["currency"]) == ("15000", "usd")
    row = payment(h.engine, result.id)
    assert (row.status, row.amount_cents, row.bundle) == ("open", 15000, "team")
    assert h.balance(aid) == 10 * USD  # nothing granted before Stripe says paid

    with pytest.raises(CheckoutError) as info:
        create_checkout(h.engine, h.client, h.plans, h.settings, account_id=aid, bundle="gold")
    assert info.value.param == "bundle" and info.value.code == "unknown_bundle"


def test_paid_checkout_grants_credits_and_the_paid_plan_never_a_lower_allowance(
    h: Harness,
) -> None:
    """Issue 14: a free account (200,000 tokens/day) that bought the $50 bundle dropped to
    2,000 tokens/day. The paid plan's only limit is its credits."""
    aid = h.account()  # free plan, $10, 200,000 tokens/day
    assert h.cap(aid) is None and plan_of(h.engine, aid) == "free"
    solo = h.buy(aid, "solo")
    assert h.balance(aid) == 60 * USD and h.redis_balance(aid) == 60 * USD
    assert plan_of(h.engine, aid) == "paid" and h.cap(aid) is None
    assert h.r.hmget(rk.account(aid), "plan", "tpd") == [b"paid", None]
    row = payment(h.engine, solo)
    assert row.status == PaymentStatus.paid.value and row.payment_intent_id.startswith("pi_")
    assert not row.capped_budget
    h.buy(aid, "team")
    assert h.balance(aid) == 210 * USD and h.cap(aid) is None


def test_a_capped_budget_is_the_customers_choice_at_checkout(h: Harness) -> None:
    """The storefront's promise: a bundle bought as a capped budget carries its daily cap
    (a hard stop per UTC day); a bigger capped bundle raises it, a smaller never lowers it."""
    aid = h.account()
    h.buy(aid, "solo", capped=True)
    assert plan_of(h.engine, aid) == "paid" and h.cap(aid) == 2_000
    assert h.r.hmget(rk.account(aid), "plan", "tpd") == [b"paid", b"2000"]
    h.buy(aid, "team", capped=True)  # a bigger bundle raises the cap
    assert h.balance(aid) == 210 * USD and h.cap(aid) == 7_000
    h.buy(aid, "solo", capped=True)  # a smaller one never lowers it
    h.buy(aid, "solo")  # nor does an uncapped purchase lift the customer's own choice
    assert h.balance(aid) == 310 * USD and h.cap(aid) == 7_000
    assert h.redis_balance(aid) == 310 * USD
    assert h.r.hget(rk.account(aid), "tpd") == b"7000"


def test_custom_plan_keeps_its_limits(h: Harness) -> None:
    aid = h.account("enterprise")
    h.buy(aid, "scale")
    assert plan_of(h.engine, aid) == "enterprise" and h.cap(aid) is None
    assert h.balance(aid) == 300 * USD


def test_delayed_payment_grants_only_when_paid(h: Harness) -> None:
    aid = h.account()
    ok = h.checkout(aid, "solo")
    completed = h.deliver("checkout.session.completed", h.fake.pay(ok, delayed=True))
    assert completed.outcome == "awaiting_payment"
    assert h.balance(aid) == 10 * USD and plan_of(h.engine, aid) == "free"
    result = h.deliver("checkout.session.async_payment_succeeded", h.fake.settle_delayed(ok))
    assert result.outcome == "applied"
    assert h.balance(aid) == 60 * USD and h.cap(aid) is None  # the paid plan: credits only

    bad = h.checkout(aid, "scale")
    h.deliver("checkout.session.completed", h.fake.pay(bad, delayed=True))
    failed = h.deliver(
        "checkout.session.async_payment_failed", h.fake.settle_delayed(bad, succeeded=False)
    )
    assert failed.outcome == "payment_failed"
    assert payment(h.engine, bad).status == PaymentStatus.failed.value
    assert h.balance(aid) == 60 * USD and h.cap(aid) is None


def test_success_arriving_before_completed_grants_once(h: Harness) -> None:
    aid = h.account()
    cs = h.checkout(aid, "solo")
    unpaid = h.fake.pay(cs, delayed=True)
    paid = h.fake.settle_delayed(cs)
    assert h.deliver("checkout.session.async_payment_succeeded", paid).outcome == "applied"
    assert h.deliver("checkout.session.completed", unpaid).outcome == "already_fulfilled"
    assert h.deliver("checkout.session.completed", paid).outcome == "already_fulfilled"
    assert h.balance(aid) == 60 * USD and h.redis_balance(aid) == 60 * USD


def test_the_fake_over_http_for_other_processes(h: Harness) -> None:
    from billing.stripe_client import make_stripe_client
    from tests.billing.fake_stripe import serve

    with serve(h.fake) as base:
        settings = h.settings.model_copy(update={"stripe_api_base": base})
        client = make_stripe_client(settings, max_network_retries=0)
        aid = h.account()
        result = create_checkout(
            h.engine, client, h.plans, h.settings, account_id=aid, bundle="solo"
        )
    assert result.id in h.fake.sessions and result.amount_cents == 5000
