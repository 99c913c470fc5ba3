"""Holds live exactly as long as their request (issue 10): extended while it runs, a stream's
usage checkpointed into its hold, and a hold nobody settles reaped at its last checkpoint,
through the settlement path (Redis balance and caps, the usage stream, the SQL ledger and
the provider's earnings), once, whichever of the settlement and the reaper comes first.
Real Redis, drained into real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from billing import earnings, ledger
from billing.admission import Admission, Admitted, connect
from billing.meter import UsageMeter
from billing.plans import Plans
from billing.verify import verify_ledger
from core.schema import UsageEvent
from kernel import redis_keys as rk
from kernel.money import split_cost
from tests.billing.conftest import IN, MODEL, OUT, REDIS_URL, USD, Customer, make_customer

NOON = (datetime.now(UTC) + timedelta(days=2)).replace(hour=12, minute=0, second=0, microsecond=0)
NOW = NOON.timestamp()
DAY = NOON.strftime("%Y%m%d")
TTL_S = 10
RESERVED = (2 * IN, 2 * OUT)  # reserved at twice the catalog price: a dearer candidate
SERVED = (IN, OUT)  # served by a provider at the catalog price


@pytest.fixture
async def adm(r: redis.Redis, plans: Plans) -> AsyncIterator[Admission]:
    """Admission on the ingress's own client, with a short TTL."""
    client = connect(REDIS_URL)
    yield Admission(client, plans, hold_ttl_s=TTL_S)
    await client.aclose()


async def admit(adm: Admission, c: Customer, rid: str, now: float = NOW, prompt: int = 10,
                max_tokens: int = 100) -> Admitted:  # fmt: skip
    admitted = await adm.admit(api_key=c.key, request_id=rid, model=MODEL,
                               prompt_tokens=prompt, max_tokens=max_tokens, customer_tag="acme",
                               now=now, price=RESERVED)  # fmt: skip
    assert isinstance(admitted, Admitted)
    return admitted


def events(r: redis.Redis) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _id, fields in r.xrange(rk.USAGE_STREAM)
    ]


def balance(r: redis.Redis, c: Customer) -> int:
    return int(r.get(rk.balance(c.account_id)) or 0)


def sql_usage(engine: Engine) -> dict[str, tuple[str, int, int, int, str]]:
    """request id → (outcome, prompt, completion, cost, provider) in the SQL usage ledger."""
    with Session(engine) as session:
        return {
            row.request_id: (
                row.outcome,
                row.prompt_tokens,
                row.completion_tokens,
                row.cost_nusd,
                row.provider_id,
            )  # fmt: skip
            for row in session.scalars(select(UsageEvent))
        }


def credits(engine: Engine, c: Customer) -> int:
    with Session(engine) as session:
        return ledger.balance(session, ledger.customer_credits(c.account_id))


async def test_reap_bills_the_last_checkpoint_at_its_providers_price(
    engine: Engine, r: redis.Redis, plans: Plans, adm: Admission, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    await admit(adm, c, "cut")
    await admit(adm, c, "silent")  # nothing delivered that billing knows of
    for completion, at in ((0, 1), (7, 2), (31, 3)):
        assert await adm.checkpoint(request_id="cut", prompt_tokens=10,
                                    completion_tokens=completion, provider_id="prov-a",
                                    price=SERVED, now=NOW + at)  # fmt: skip
    # a checkpoint that arrives late, below the last one, changes nothing it holds
    assert await adm.checkpoint(request_id="cut", prompt_tokens=10, completion_tokens=12,
                                provider_id="prov-a", price=SERVED, now=NOW + 4)  # fmt: skip
    assert await adm.reap(now=NOW + TTL_S) == 1  # "silent": its TTL is over, "cut" extended
    assert await adm.reap(now=NOW + 4 + TTL_S - 0.001) == 0
    assert await adm.reap(now=NOW + 4 + TTL_S) == 1
    cost = 10 * IN + 31 * OUT  # the checkpoint, at the serving provider's price
    assert balance(r, c) == USD - cost
    assert int(r.get(rk.day(c.account_id, DAY))) == 41  # the caps count what was billed
    assert r.hget(rk.tag_day(c.account_id, DAY), "acme") == b"41"
    assert r.zcard(rk.HOLDS) == 0 and not r.smembers(rk.account_holds(c.account_id))
    by_id = {e["request_id"]: e for e in events(r)}
    cut, silent = by_id["cut"], by_id["silent"]
    assert (cut["outcome"], cut["prompt_tokens"], cut["completion_tokens"]) == (
        "reaped",
        "10",
        "31",
    )
    assert (cut["provider_id"], cut["input_nusd_per_token"], cut["output_nusd_per_token"]) == (
        "prov-a", str(IN), str(OUT))  # fmt: skip
    assert (cut["cost_nusd"], cut["provider_share_nusd"]) == (str(cost), str(split_cost(cost)[0]))
    assert (silent["outcome"], silent["cost_nusd"], silent["provider_id"]) == ("reaped", "0", "")
    # the ledger records it once: the customer paid, the provider earned its share
    assert meter.drain_all() == 2
    assert sql_usage(engine) == {"cut": ("reaped", 10, 31, cost, "prov-a"),
                                 "silent": ("reaped", 0, 0, 0, "")}  # fmt: skip
    assert credits(engine, c) == USD - cost == balance(r, c)
    assert earnings.totals(engine, "prov-a").payable_nusd == split_cost(cost)[0]
    result = verify_ledger(engine)
    assert result.ok, result.problems


async def test_a_late_settle_after_a_reap_bills_nothing_more(
    engine: Engine, r: redis.Redis, plans: Plans, adm: Admission, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    await admit(adm, c, "late")
    assert await adm.checkpoint(request_id="late", prompt_tokens=10, completion_tokens=20,
                                provider_id="prov-a", price=SERVED, now=NOW)  # fmt: skip
    assert await adm.reap(now=NOW + TTL_S) == 1
    # the ingress comes back from a Redis outage and settles what it delivered in the end
    assert not await adm.settle(request_id="late", prompt_tokens=10, completion_tokens=60,
                                provider_id="prov-a", price=SERVED)  # fmt: skip
    assert not await adm.checkpoint(request_id="late", prompt_tokens=10, completion_tokens=70,
                                    provider_id="prov-a", price=SERVED)  # fmt: skip
    assert not r.exists(rk.hold("late"))  # a checkpoint never brings a hold back
    assert await adm.reap(now=NOW + 100 * TTL_S) == 0
    cost = 10 * IN + 20 * OUT
    assert [e["completion_tokens"] for e in events(r)] == ["20"]
    assert balance(r, c) == USD - cost
    assert meter.drain_all() == 1
    assert sql_usage(engine) == {"late": ("reaped", 10, 20, cost, "prov-a")}
    assert credits(engine, c) == USD - cost


async def test_a_settle_before_the_reap_wins(
    engine: Engine, r: redis.Redis, plans: Plans, adm: Admission, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    await admit(adm, c, "done")
    assert await adm.checkpoint(request_id="done", prompt_tokens=10, completion_tokens=20,
                                provider_id="prov-a", price=SERVED, now=NOW)  # fmt: skip
    assert await adm.settle(request_id="done", prompt_tokens=10, completion_tokens=64,
                            provider_id="prov-a", price=SERVED, now=NOW + 1)  # fmt: skip
    assert await adm.reap(now=NOW + 100 * TTL_S) == 0
    cost = 10 * IN + 64 * OUT
    assert [(e["outcome"], e["completion_tokens"]) for e in events(r)] == [("settled", "64")]
    assert balance(r, c) == USD - cost
    assert int(r.get(rk.day(c.account_id, DAY))) == 74
    assert meter.drain_all() == 1
    assert sql_usage(engine) == {"done": ("settled", 10, 64, cost, "prov-a")}


async def test_extending_keeps_a_hold_alive_past_its_first_expiry(
    r: redis.Redis, sqlite_engine: Engine, plans: Plans, adm: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, usd=1)
    await admit(adm, c, "long")
    await admit(adm, c, "other")
    assert adm.hold_ttl_s == TTL_S
    # an ingress extends every request it has in flight, in one call
    assert await adm.extend_many(["long", "other", "gone"], now=NOW + 8) == 2
    assert await adm.reap(now=NOW + TTL_S) == 0  # the first expiry passes
    assert await adm.reap(now=NOW + 8 + TTL_S - 0.001) == 0
    # an extension never shortens a hold: "long" was extended further by its checkpoint
    assert await adm.checkpoint(request_id="long", prompt_tokens=10, completion_tokens=5,
                                provider_id="prov-a", price=SERVED, now=NOW + 12)  # fmt: skip
    assert await adm.extend(request_id="long", now=NOW + 9)
    assert await adm.reap(now=NOW + 8 + TTL_S) == 1  # "other" (nobody extended it since)
    assert r.exists(rk.hold("long"))
    assert await adm.reap(now=NOW + 12 + TTL_S) == 1
    assert await adm.extend_many(["long", "other"]) == 0  # neither is open any more
    assert [(e["request_id"], e["completion_tokens"]) for e in events(r)] == [
        ("other", "0"), ("long", "5")]  # fmt: skip


async def test_concurrent_settles_and_reaps_bill_each_request_once(
    engine: Engine, r: redis.Redis, plans: Plans, meter: UsageMeter
) -> None:
    """Property-style: 120 holds with random checkpoints, settled while several reapers sweep
    (each on its own connections), in random order. Each request is billed once: its
    settlement where that came first, its checkpoint (or zero) where the reaper did; the
    totals in Redis, the SQL ledger and the providers' earnings are exactly their sum."""
    rng = random.Random(10)
    c = make_customer(engine, r, plans, usd=10)
    clients = [connect(REDIS_URL) for _ in range(4)]
    adms = [Admission(client, plans, hold_ttl_s=TTL_S) for client in clients]
    try:
        plan: dict[str, tuple[int | None, int, float]] = {}
        for i in range(120):
            rid = f"race-{i}"
            await admit(adms[0], c, rid, prompt=10 + i % 7)
            checkpoint = rng.choice([None, rng.randint(0, 50)])
            if checkpoint is not None:
                await adms[1].checkpoint(request_id=rid, prompt_tokens=10 + i % 7,
                                         completion_tokens=checkpoint, provider_id=f"prov-{i % 3}",
                                         price=SERVED, now=NOW)  # fmt: skip
            delay = 0.0 if i % 10 == 5 else rng.random() * 0.05  # some as the reapers start
            plan[rid] = (checkpoint, rng.randint(checkpoint or 0, 100), delay)
        settled: dict[str, bool] = {}

        async def settle(rid: str, i: int) -> None:
            _, final, delay = plan[rid]
            await asyncio.sleep(delay)
            settled[rid] = await adms[i % 2].settle(request_id=rid, prompt_tokens=10 + i % 7,
                                                    completion_tokens=final,
                                                    provider_id=f"prov-{i % 3}", price=SERVED,
                                                    now=NOW + TTL_S)  # fmt: skip

        async def reaper(a: Admission, delay: float) -> int:
            reaped = 0
            for _ in range(6):
                await asyncio.sleep(delay)
                reaped += await a.reap(now=NOW + TTL_S, limit=3)  # every hold has expired
            return reaped

        results = await asyncio.gather(
            *(settle(rid, i) for i, rid in enumerate(plan)),
            *(reaper(a, d) for a, d in zip(adms[2:] * 2, (0.0, 0.004, 0.007, 0.01), strict=True)),
        )
        reaped = sum(results[len(plan) :])
        assert reaped and any(settled.values())  # both sides won some
        assert reaped + sum(settled.values()) == len(plan)
        assert await adms[0].reap(now=NOW + 100 * TTL_S) == 0
    finally:
        for client in clients:
            await client.aclose()

    want: dict[str, tuple[str, int, int, int, str]] = {}
    for i, (rid, (checkpoint, final, _)) in enumerate(plan.items()):
        prompt, provider = 10 + i % 7, f"prov-{i % 3}"
        if settled[rid]:
            want[rid] = ("settled", prompt, final, prompt * IN + final * OUT, provider)
        elif checkpoint is None:
            want[rid] = ("reaped", 0, 0, 0, "")
        else:
            want[rid] = ("reaped", prompt, checkpoint, prompt * IN + checkpoint * OUT, provider)
    billed = sum(w[3] for w in want.values())
    assert len(events(r)) == len(plan)
    assert balance(r, c) == 10 * USD - billed
    assert int(r.get(rk.day(c.account_id, DAY))) == sum(w[1] + w[2] for w in want.values())
    assert meter.drain_all(50) == len(plan)
    assert sql_usage(engine) == want
    assert credits(engine, c) == 10 * USD - billed
    for p in ("prov-0", "prov-1", "prov-2"):
        share = sum(split_cost(w[3])[0] for w in want.values() if w[4] == p)
        assert earnings.totals(engine, p).payable_nusd == share
    result = verify_ledger(engine)
    assert result.ok, result.problems
