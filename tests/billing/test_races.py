"""Library-level races: 200 concurrent admit → settle cycles against one account, on a real
Redis, drained into real SQLite and PostgreSQL. The cap and the credits hold under
concurrency, and the ledger records exactly what was settled."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from billing import accounts as svc
from billing import ledger
from billing.admission import Admission, Refused, connect, utc_day
from billing.meter import UsageMeter
from billing.plans import Plans
from billing.verify import verify_ledger
from core.schema import UsageEvent
from kernel import redis_keys as rk
from kernel.money import split_cost
from tests.billing.conftest import IN, MODEL, OUT, REDIS_URL, USD, Customer, make_customer

N = 200
SEED = 7
CAP = 2_000
PROMPT, MAX_TOKENS = 20, 100
FULL_COST = PROMPT * IN + MAX_TOKENS * OUT
CREDITS = 20 * FULL_COST  # enough for about 20 requests


@dataclass(frozen=True)
class Plan:
    """One request's random choices, drawn before the race so the run is reproducible."""

    prompt: int
    max_tokens: int
    share: float  # completion tokens = floor(share × granted max_tokens)
    admit_delay_s: float
    settle_delay_s: float


@dataclass
class Outcome:
    settled: dict[str, tuple[int, int]]  # request id → (prompt, completion) reported
    refusals: list[Refused]
    min_balance: int
    max_day_used: int


async def race(adm: Admission, r: redis.Redis, c: Customer, plans: list[Plan]) -> Outcome:
    settled: dict[str, tuple[int, int]] = {}
    refusals: list[Refused] = []
    day, _ = utc_day(time.time())
    watch = Watch(r, c.account_id, day)

    async def cycle(i: int, p: Plan) -> None:
        await asyncio.sleep(p.admit_delay_s)
        rid = f"race-{i}"
        result = await adm.admit(
            api_key=c.key,
            request_id=rid,
            model=MODEL,
            prompt_tokens=p.prompt,
            max_tokens=p.max_tokens,
            customer_tag="tag-a" if i % 2 else None,
        )
        if isinstance(result, Refused):
            refusals.append(result)
            return
        assert 1 <= result.max_tokens <= p.max_tokens
        completion = int(p.share * result.max_tokens)
        await asyncio.sleep(p.settle_delay_s)
        assert await adm.settle(
            request_id=rid,
            prompt_tokens=p.prompt,
            completion_tokens=completion,
            provider_id=f"prov-{i % 3}",
        )
        settled[rid] = (p.prompt, completion)

    sampler = asyncio.create_task(watch.run())
    await asyncio.gather(*(cycle(i, p) for i, p in enumerate(plans)))
    watch.done = True
    await sampler
    watch.sample()
    return Outcome(settled, refusals, watch.min_balance, watch.max_day_used)


class Watch:
    """Samples the account's Redis balance and day counter while the race runs."""

    def __init__(self, r: redis.Redis, account_id: int, day: str) -> None:
        self.r, self.account_id, self.day = r, account_id, day
        self.min_balance: int = 2**62
        self.max_day_used = 0
        self.done = False

    def sample(self) -> None:
        bal, used = self.r.mget(rk.balance(self.account_id), rk.day(self.account_id, self.day))
        self.min_balance = min(self.min_balance, int(bal or 0))
        self.max_day_used = max(self.max_day_used, int(used or 0))

    async def run(self) -> None:
        while not self.done:
            self.sample()
            await asyncio.sleep(0.002)


@pytest.fixture
async def admission(r: redis.Redis, plans: Plans) -> AsyncIterator[Admission]:
    """Admission on the client the ingress uses (billing.admission.connect): a pool that waits
    for a free connection. redis-py's default pool refuses the 101st concurrent command."""
    client = connect(REDIS_URL)
    yield Admission(client, plans)
    await client.aclose()


def draw(seed: int, *, vary_prompt: bool) -> list[Plan]:
    rng = random.Random(seed)
    return [
        Plan(
            prompt=rng.randint(5, 40) if vary_prompt else PROMPT,
            max_tokens=rng.randint(10, 200) if vary_prompt else MAX_TOKENS,
            share=rng.random(),
            admit_delay_s=rng.random() * 0.05,
            settle_delay_s=rng.random() * 0.01,
        )
        for _ in range(N)
    ]


def check_ledger(
    engine: Engine, r: redis.Redis, meter: UsageMeter, c: Customer, out: Outcome, start: int
) -> int:
    """Drain, then check SQL against what was settled; returns the total billed."""
    costs = {rid: p * IN + n * OUT for rid, (p, n) in out.settled.items()}
    billed = sum(costs.values())
    assert meter.drain_all(50) == len(out.settled)
    with Session(engine) as session:
        rows = session.scalars(select(UsageEvent)).all()
        assert sorted(row.request_id for row in rows) == sorted(out.settled)  # one per request
        for row in rows:
            assert (row.prompt_tokens, row.completion_tokens) == out.settled[row.request_id]
            assert row.cost_nusd == costs[row.request_id]
        assert session.scalar(select(func.sum(UsageEvent.cost_nusd))) == billed
        credits = ledger.balance(session, ledger.customer_credits(c.account_id))
        providers = sum(
            ledger.balance(session, ledger.provider_payable(f"prov-{i}")) for i in (0, 1, 2)
        )
        platform = ledger.balance(session, ledger.PLATFORM_REVENUE)
    assert credits == start - billed >= 0
    assert providers == sum(split_cost(cost)[0] for cost in costs.values())
    assert providers + platform == billed
    assert int(r.get(rk.balance(c.account_id))) == credits  # Redis agrees with SQL
    assert r.zcard(rk.HOLDS) == 0 and not r.exists(rk.undrained(c.account_id))
    result = verify_ledger(engine)
    assert result.ok, result.problems
    assert result.usage_rows == len(out.settled)
    return billed


async def test_200_concurrent_requests_against_a_daily_cap(
    engine: Engine,
    r: redis.Redis,
    plans: Plans,
    admission: Admission,
    meter: UsageMeter,
) -> None:
    c = make_customer(engine, r, plans, usd=100, tokens_per_day=CAP)
    out = await race(admission, r, c, draw(SEED, vary_prompt=True))

    tokens = sum(p + n for p, n in out.settled.values())
    assert tokens <= CAP
    assert out.max_day_used <= CAP  # reservations included, at every sample
    assert len(out.settled) >= CAP // (40 + 200) and out.refusals  # 240: the largest ask
    assert {(x.status, x.code) for x in out.refusals} == {(429, "daily_cap_exceeded")}
    assert len(out.settled) + len(out.refusals) == N
    day, _ = utc_day(time.time())
    assert int(r.get(rk.day(c.account_id, day))) == tokens  # refunds returned all the rest
    check_ledger(engine, r, meter, c, out, 100 * USD)


async def test_200_concurrent_requests_against_credits_for_about_20(
    engine: Engine,
    r: redis.Redis,
    plans: Plans,
    admission: Admission,
    meter: UsageMeter,
) -> None:
    c = make_customer(engine, r, plans)  # paid plan: no daily cap, only the credits
    svc.grant_credits(engine, r, account_id=c.account_id, amount_nusd=CREDITS)
    out = await race(admission, r, c, draw(SEED, vary_prompt=False))

    assert out.min_balance >= 0
    assert 20 <= len(out.settled) < N  # refunds of unused output let a few more in
    assert {(x.status, x.code) for x in out.refusals} == {(402, "insufficient_credits")}
    assert len(out.settled) + len(out.refusals) == N
    billed = check_ledger(engine, r, meter, c, out, CREDITS)
    assert billed <= CREDITS
