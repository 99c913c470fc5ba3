import asyncio
import threading
import time

import redis
import redis.asyncio as aredis
from sqlalchemy import Engine, event, func, select
from sqlalchemy.orm import Session

from billing import ledger
from billing.admission import Admission
from billing.loop import BillingLoop
from billing.meter import UsageMeter
from billing.plans import Plans
from billing.verify import verify_ledger
from core.schema import ApiKey, UsageEvent
from kernel import redis_keys as rk
from kernel.money import split_cost
from tests.billing.conftest import IN, MODEL, OUT, REDIS_URL, USD, Customer, make_customer


async def serve(
    adm: Admission, c: Customer, n: int, *, start: int = 0, provider: str = "prov-a"
) -> int:
    """Admit and settle n requests of 10 + 20 tokens; returns their total cost."""
    total = 0
    for i in range(start, start + n):
        result = await adm.admit(
            api_key=c.key,
            request_id=f"req-{i}",
            model=MODEL,
            prompt_tokens=10,
            max_tokens=50,
            customer_tag="acme",
        )
        assert result.__class__.__name__ == "Admitted"
        await adm.settle(
            request_id=f"req-{i}", prompt_tokens=10, completion_tokens=20 + i, provider_id=provider
        )
        total += 10 * IN + (20 + i) * OUT
    return total


def usage_count(engine: Engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(UsageEvent)) or 0


async def test_drain_records_usage_and_ledger(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    cost = await serve(admission, c, 3)
    assert meter.drain_once() == 3
    assert meter.drain_once() == 0
    assert usage_count(engine) == 3
    assert r.xlen(rk.USAGE_STREAM) == 0
    assert not r.exists(rk.undrained(c.account_id))
    with Session(engine) as session:
        assert ledger.balance(session, ledger.customer_credits(c.account_id)) == USD - cost
        provider = ledger.balance(session, ledger.provider_payable("prov-a"))
        platform = ledger.balance(session, ledger.PLATFORM_REVENUE)
        rows = session.scalars(select(UsageEvent).order_by(UsageEvent.id)).all()
        key = session.get(ApiKey, c.key_id)
    assert provider + platform == cost
    assert provider == sum(row.provider_share_nusd for row in rows)
    assert [row.request_id for row in rows] == ["req-0", "req-1", "req-2"]
    assert rows[1].prev_hash == rows[0].row_hash
    assert rows[0].customer_tag == "acme" and rows[0].usage_day.count("-") == 2
    assert key is not None and key.last_used_at is not None
    assert verify_ledger(engine).ok


async def test_replayed_events_are_recorded_once(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    await serve(admission, c, 2)
    copies = [fields for _id, fields in r.xrange(rk.USAGE_STREAM)]
    meter.drain_once()
    for fields in copies + copies:  # the same events, delivered again (twice)
        r.xadd(rk.USAGE_STREAM, fields)
    assert meter.drain_once() == 4
    assert usage_count(engine) == 2
    assert r.xlen(rk.USAGE_STREAM) == 0
    assert r.xpending(rk.USAGE_STREAM, rk.METER_GROUP)["pending"] == 0
    with Session(engine) as session:
        assert ledger.balance(session, ledger.customer_credits(c.account_id)) == USD - sum(
            row.cost_nusd for row in session.scalars(select(UsageEvent))
        )
    assert verify_ledger(engine).ok


async def test_crash_after_commit_before_ack_replays_harmlessly(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    await serve(admission, c, 3)
    batch = meter.read_batch(10)
    meter.record(batch)  # committed, then the process died before XACK
    assert usage_count(engine) == 3
    assert r.xpending(rk.USAGE_STREAM, rk.METER_GROUP)["pending"] == 3
    restarted = UsageMeter(engine, r, consumer="test-meter")  # same consumer name
    assert restarted.drain_once() == 3  # its own pending entries first
    assert usage_count(engine) == 3
    assert r.xpending(rk.USAGE_STREAM, rk.METER_GROUP)["pending"] == 0
    assert verify_ledger(engine).ok


async def test_entries_of_a_dead_consumer_are_reclaimed(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    await serve(admission, c, 4)
    dead = UsageMeter(engine, r, consumer="dead")
    assert len(dead.read_batch(10)) == 4  # read, then crashed before writing anything
    other = UsageMeter(engine, r, consumer="other", claim_idle_ms=60_000)
    assert other.drain_once() == 0  # not idle long enough to take over
    assert usage_count(engine) == 0
    other.claim_idle_ms = 0
    assert other.drain_once() == 4
    assert usage_count(engine) == 4
    assert r.xpending(rk.USAGE_STREAM, rk.METER_GROUP)["pending"] == 0
    assert verify_ledger(engine).ok


async def test_bad_events_are_dead_lettered(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    await serve(admission, c, 1)
    [(_id, good)] = r.xrange(rk.USAGE_STREAM)
    wrong_cost = {**good, b"request_id": b"forged", b"cost_nusd": b"1"}
    unknown = {**good, b"request_id": b"nobody", b"account_id": b"999"}
    broken = {b"request_id": b"junk"}
    for fields in (wrong_cost, unknown, broken):
        r.xadd(rk.USAGE_STREAM, fields)
    assert meter.drain_once() == 4
    assert usage_count(engine) == 1
    dead = {f[b"request_id"]: f[b"error"] for _i, f in r.xrange(rk.DEAD_STREAM)}
    assert set(dead) == {b"forged", b"nobody", b"junk"}
    assert b"tokens" in dead[b"forged"] and b"unknown account" in dead[b"nobody"]
    assert r.xlen(rk.USAGE_STREAM) == 0
    assert verify_ledger(engine).ok


async def test_zero_cost_usage_has_no_transfer(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    await admission.admit(
        api_key=c.key,
        request_id="cancelled",
        model=MODEL,
        prompt_tokens=5,
        max_tokens=5,
        customer_tag=None,
    )
    await admission.settle(
        request_id="cancelled", prompt_tokens=0, completion_tokens=0, provider_id="p"
    )
    meter.drain_once()
    with Session(engine) as session:
        row = session.scalars(select(UsageEvent)).one()
        assert row.cost_nusd == 0
        assert not ledger.transfer_exists(session, "usage:cancelled")
        assert ledger.balance(session, ledger.customer_credits(c.account_id)) == USD


def test_billing_loop_rebuilds_and_drains(engine: Engine, r: redis.Redis, plans: Plans) -> None:
    c = make_customer(engine, r, plans, usd=1)

    async def traffic() -> None:
        client = aredis.Redis.from_url(REDIS_URL)
        await serve(Admission(client, plans), c, 2)
        await client.aclose()

    asyncio.run(traffic())
    chores: list[int] = []
    loop = BillingLoop(
        str(engine.url.render_as_string(hide_password=False)),
        REDIS_URL,
        consumer="loop",
        block_ms=10,
        reap_every_s=0,
        chores=[lambda: chores.append(1)],
    )
    assert loop.run(max_iterations=3) == 2
    assert usage_count(engine) == 2
    assert chores == [1, 1, 1]  # the host's chores run with every reap
    r.delete(rk.READY, rk.api_key("x"))
    r.delete(rk.balance(c.account_id))  # Redis lost its copy
    loop.step()
    assert r.exists(rk.READY)
    with Session(engine) as session:
        assert int(r.get(rk.balance(c.account_id))) == ledger.balance(
            session, ledger.customer_credits(c.account_id)
        )
    loop.stop()
    assert loop.run() == 0  # stopped
    loop.engine.dispose()


def forged(good: dict[bytes, bytes], rid: str, completion: int) -> dict[bytes, bytes]:
    """A copy of a real event with another request id and completion count, priced right."""
    prompt = int(good[b"prompt_tokens"])
    cost = prompt * IN + completion * OUT
    provider, platform = split_cost(cost)
    return {
        **good,
        b"request_id": rid.encode(),
        b"completion_tokens": str(completion).encode(),
        b"cost_nusd": str(cost).encode(),
        b"provider_share_nusd": str(provider).encode(),
        b"platform_share_nusd": str(platform).encode(),
    }


async def test_credits_short_mid_batch_dead_letters_only_that_event(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    first = await serve(admission, c, 1)
    [(_id, good)] = r.xrange(rk.USAGE_STREAM)
    left = USD - first
    big = (left - 10 * IN) // OUT  # the most the rest of the credits pay for
    for rid, completion in (("fits", big // 2), ("too-big", big), ("small", 1)):
        r.xadd(rk.USAGE_STREAM, forged(good, rid, completion))
    assert meter.drain_once() == 4
    dead = {f[b"request_id"]: f[b"error"] for _i, f in r.xrange(rk.DEAD_STREAM)}
    assert set(dead) == {b"too-big"} and b"cannot cover" in dead[b"too-big"]
    with Session(engine) as session:
        rows = session.scalars(select(UsageEvent).order_by(UsageEvent.id)).all()
        credits = ledger.balance(session, ledger.customer_credits(c.account_id))
    assert [row.request_id for row in rows] == ["req-0", "fits", "small"]
    assert credits == USD - sum(row.cost_nusd for row in rows) >= 0
    assert verify_ledger(engine).ok


async def test_a_batch_costs_the_same_statements_whatever_its_size(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    statements: list[str] = []

    def count(_conn, _cursor, statement, _params, _context, _many) -> None:  # noqa: ANN001
        statements.append(statement.split()[0].upper())

    event.listen(engine, "before_cursor_execute", count)
    try:
        per_batch = []
        for start, n in ((0, 1), (1, 2), (3, 40)):  # the first creates the ledger accounts
            await serve(admission, c, n, start=start)
            statements.clear()
            assert meter.drain_once() == n
            per_batch.append(list(statements))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert per_batch[1] == per_batch[2]
    assert per_batch[2].count("UPDATE") == 2  # ledger balances (one executemany), the key
    assert usage_count(engine) == 43
    assert verify_ledger(engine).ok


def test_a_payout_run_that_hangs_does_not_stop_metering(
    engine: Engine, r: redis.Redis, plans: Plans
) -> None:
    """Issue 11: payouts ran inside the metering loop, so a Stripe call that hangs stopped
    every account's usage from reaching the ledger. They run in a thread of their own."""
    c = make_customer(engine, r, plans, usd=1)
    loop = BillingLoop(
        str(engine.url.render_as_string(hide_password=False)), REDIS_URL, consumer="loop",
        block_ms=10, reap_every_s=0,
    )  # fmt: skip
    stripe_answers = threading.Event()
    paying = threading.Event()

    def hung() -> None:  # as Stripe not answering would
        paying.set()
        stripe_answers.wait(60)

    loop.pay_due_week = hung  # type: ignore[method-assign]
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    try:
        assert paying.wait(30)  # the payout run is stuck in Stripe now

        async def traffic() -> None:
            client = aredis.Redis.from_url(REDIS_URL)
            await serve(Admission(client, plans), c, 2)
            await client.aclose()

        asyncio.run(traffic())
        deadline = time.monotonic() + 30
        while usage_count(engine) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert usage_count(engine) == 2  # metered all the same
    finally:
        loop.stop()
        stripe_answers.set()
        runner.join(30)
        loop.engine.dispose()


def test_under_steady_traffic_the_loop_takes_usage_in_batches(
    engine: Engine, r: redis.Redis, plans: Plans
) -> None:
    """Issue 13: the loop read the stream as soon as one event was there, so at c=16 each
    transaction carried a row or two and the meter spent 2.4 ms of CPU per request. After a
    short batch it lingers: what arrives meanwhile goes in the next batch, together."""
    c = make_customer(engine, r, plans, usd=1)
    loop = BillingLoop(
        str(engine.url.render_as_string(hide_password=False)), REDIS_URL, consumer="loop",
        block_ms=100, linger_s=2.0, reap_every_s=60,
    )  # fmt: skip
    batches: list[int] = []
    record = loop.meter.record

    def recording(entries):  # noqa: ANN001, ANN202
        batches.append(len(entries))
        return record(entries)

    loop.meter.record = recording  # type: ignore[method-assign]
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()

    async def traffic(start: int, n: int) -> None:
        client = aredis.Redis.from_url(REDIS_URL)
        await serve(Admission(client, plans), c, n, start=start)
        await client.aclose()

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 30
        while usage_count(engine) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert usage_count(engine) == count

    try:
        asyncio.run(traffic(0, 1))
        wait_for(1)  # read at once: the loop lingers now
        asyncio.run(traffic(1, 5))  # one request after another, as they come
        wait_for(6)
    finally:
        loop.stop()
        runner.join(10)
        loop.engine.dispose()
    assert batches == [1, 5]
    assert verify_ledger(engine).ok
