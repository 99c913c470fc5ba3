import pytest
import redis
from sqlalchemy import Engine

import billing.rebuild as rebuild_module
from billing import accounts as svc
from billing.admission import Admission, Admitted, Refused
from billing.lua_scripts import SETTLE
from billing.meter import UsageMeter
from billing.plans import Plans
from billing.rebuild import RebuildError, rebuild
from kernel import redis_keys as rk
from tests.billing.conftest import IN, MODEL, OUT, USD, make_customer, redis_int


def snapshot(r: redis.Redis) -> dict[bytes, object]:
    """Every billing key Redis must get back (not rate-limit state, markers or counters)."""
    out: dict[bytes, object] = {}
    for key in r.scan_iter(match="dg:*"):
        kind = r.type(key)
        if key.startswith((b"dg:rpm:", b"dg:done:", b"dg:settles:", b"dg:usage")):
            continue
        if kind == b"string":
            out[key] = r.get(key)
        elif kind == b"hash":
            out[key] = r.hgetall(key)
    return out


async def test_rebuild_after_redis_loss(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    a = make_customer(engine, r, plans, plan="free", tokens_per_day=50_000, rpm=30)
    b = make_customer(engine, r, plans, usd=3)
    svc.set_customer_cap(
        engine, r, account_id=a.account_id, customer_tag="acme", tokens_per_day=700
    )
    svc.set_own_cap(engine, r, account_id=b.account_id, tokens_per_day=9_000)
    revoked = svc.create_key(engine, r, account_id=b.account_id)
    svc.revoke_key(engine, r, key_id=revoked.id)
    for i, (c, tag) in enumerate([(a, "acme"), (a, None), (b, None)]):
        await admission.admit(
            api_key=c.key,
            request_id=f"r{i}",
            model=MODEL,
            prompt_tokens=40,
            max_tokens=100,
            customer_tag=tag,
        )
        await admission.settle(
            request_id=f"r{i}", prompt_tokens=40, completion_tokens=60, provider_id="p"
        )
    meter.drain_all()
    before = snapshot(r)
    assert r.hget(rk.account(b.account_id), "own") == b"9000"  # kept by the rebuild below
    assert before[rk.balance(b.account_id).encode()] == str(3 * USD - 40 * IN - 60 * OUT).encode()

    r.flushdb()  # Redis lost everything
    refused = await admission.admit(
        api_key=a.key, request_id="x", model=MODEL, prompt_tokens=1, max_tokens=1, customer_tag=None
    )
    assert isinstance(refused, Refused) and refused.status == 503

    report = rebuild(engine, r, meter=meter)
    assert (report.accounts, report.keys) == (2, 2)
    assert snapshot(r) == before
    ok = await admission.admit(
        api_key=a.key,
        request_id="y",
        model=MODEL,
        prompt_tokens=1,
        max_tokens=1,
        customer_tag="acme",
    )
    assert isinstance(ok, Admitted)
    assert ok.headers["x-ratelimit-limit-requests"] == "30"
    assert ok.headers["x-ratelimit-limit-tokens"] == "700"
    gone = await admission.admit(
        api_key=revoked.key or "",
        request_id="z",
        model=MODEL,
        prompt_tokens=1,
        max_tokens=1,
        customer_tag=None,
    )
    assert isinstance(gone, Refused) and gone.status == 401


async def test_live_rebuild_keeps_open_holds_and_undrained_usage(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=2)
    await admission.admit(
        api_key=c.key,
        request_id="done",
        model=MODEL,
        prompt_tokens=10,
        max_tokens=100,
        customer_tag="t",
    )
    await admission.settle(
        request_id="done", prompt_tokens=10, completion_tokens=30, provider_id="p"
    )  # settled, still in the stream
    await admission.admit(
        api_key=c.key,
        request_id="open",
        model=MODEL,
        prompt_tokens=20,
        max_tokens=200,
        customer_tag="t",
    )  # still streaming
    expected_bal = 2 * USD - (10 * IN + 30 * OUT) - (20 * IN + 200 * OUT)
    day_key = next(k for k in r.scan_iter(match=f"dg:day:{c.account_id}:*"))
    tag_key = next(k for k in r.scan_iter(match=f"dg:tagday:{c.account_id}:*"))
    assert redis_int(r, rk.balance(c.account_id)) == expected_bal
    r.set(rk.balance(c.account_id), 0)  # drifted copies
    r.set(day_key, 999_999)
    r.delete(tag_key)
    r.hset(rk.api_key("stale"), "account", c.account_id)

    report = rebuild(engine, r, meter=meter)
    assert report.stale_keys_removed == 1
    assert redis_int(r, rk.balance(c.account_id)) == expected_bal
    assert redis_int(r, day_key.decode()) == 40 + 220
    assert r.hget(tag_key, "t") == b"260"
    # the open request settles normally afterwards
    assert await admission.settle(
        request_id="open", prompt_tokens=20, completion_tokens=50, provider_id="p"
    )
    meter.drain_all()
    assert redis_int(r, rk.balance(c.account_id)) == 2 * USD - (30 * IN + 80 * OUT)
    assert svc.get_account(engine, c.account_id).balance_nusd == 2 * USD - (30 * IN + 80 * OUT)


def test_rebuild_refuses_while_usage_is_undrained(
    engine: Engine, r: redis.Redis, plans: Plans, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    r.incr(rk.undrained(c.account_id))  # a settled event not yet in SQL
    r.xadd(rk.USAGE_STREAM, {"request_id": "junk", "account_id": str(c.account_id)})
    r.set(rk.balance(c.account_id), 7)
    with pytest.raises(RebuildError):
        rebuild(engine, r, max_rounds=2)  # no meter to drain it: SQL is not complete
    assert redis_int(r, rk.balance(c.account_id)) == 7
    report = rebuild(engine, r, meter=meter)  # drains (dead-letters the junk), then applies
    assert report.rounds == 1
    assert redis_int(r, rk.balance(c.account_id)) == USD


async def test_rebuild_retries_when_the_account_settles_meanwhile(
    engine: Engine,
    r: redis.Redis,
    plans: Plans,
    admission: Admission,
    meter: UsageMeter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    await admission.admit(
        api_key=c.key,
        request_id="inflight",
        model=MODEL,
        prompt_tokens=10,
        max_tokens=100,
        customer_tag=None,
    )
    settle = r.register_script(SETTLE)
    real_snapshot = rebuild_module._snapshot
    calls = []

    def racing_snapshot(*args: object, **kwargs: object) -> object:
        result = real_snapshot(*args, **kwargs)  # type: ignore[arg-type]
        if not calls:  # right after SQL was read, the request settles and the actor drains
            assert settle(keys=[], args=["inflight", 10, 40, "p", 0, 1000]) == 1
            assert UsageMeter(engine, r, consumer="actor").drain_all() == 1
        calls.append(1)
        return result

    monkeypatch.setattr(rebuild_module, "_snapshot", racing_snapshot)
    r.set(rk.balance(c.account_id), 0)
    report = rebuild(engine, r, meter=meter)
    assert report.rounds == 2 and len(calls) == 2
    assert redis_int(r, rk.balance(c.account_id)) == USD - (10 * IN + 40 * OUT)
