"""A provider's earnings summary (`GET /v1/providers/me`): what it served, from the usage
ledger, and what is still payable, from the double-entry ledger."""

import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from billing import earnings, ledger
from billing.admission import Admission
from billing.meter import UsageMeter
from billing.plans import Plans
from kernel.money import split_cost
from tests.billing.conftest import IN, OUT, make_customer
from tests.billing.test_meter import serve


async def test_totals_come_from_the_usage_ledger_and_the_payable_account(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    assert earnings.totals(engine, "prv_a").to_json() == {
        "requests": 0,
        "earned_nusd": 0,
        "payable_nusd": 0,
    }
    c = make_customer(engine, r, plans, usd=1)
    await serve(admission, c, 2, provider="prv_a")  # requests 0 and 1: 10 + 20 + i tokens
    await serve(admission, c, 1, start=2, provider="prv_b")
    shares = [split_cost(10 * IN + (20 + i) * OUT)[0] for i in range(2)]
    assert meter.drain_once() == 3
    earned = sum(shares)
    assert earnings.totals(engine, "prv_a").to_json() == {
        "requests": 2,
        "earned_nusd": earned,
        "payable_nusd": earned,
    }
    with Session(engine) as session, session.begin():  # a payout takes what is payable
        ledger.post_transfer(
            session,
            idempotency_key="payout:prv_a",
            kind="payout_pending",
            legs=[
                ledger.Leg(
                    ledger.provider_payable("prv_a"), earnings.payouts_pending("prv_a"), earned
                )
            ],
        )
    assert earnings.totals(engine, "prv_a").to_json() == {
        "requests": 2,
        "earned_nusd": earned,
        "payable_nusd": 0,
    }
    assert earnings.totals(engine, "prv_b").requests == 1
