import asyncio
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
import redis
from sqlalchemy import Engine

from billing import accounts as svc
from billing.admission import Admission, Admitted, Refused, Settlement
from billing.plans import Plans
from kernel import redis_keys as rk
from kernel.tokens import hash_key
from kernel.usage_event import FIELDS, UsageRecord
from tests.billing.conftest import IN, MODEL, OUT, USD, Customer, make_customer, redis_int

# An injected clock: noon UTC of a day ahead (Redis expires day counters by wall-clock time,
# so the test days must not be in the past).
NOON = (datetime.now(UTC) + timedelta(days=2)).replace(hour=12, minute=0, second=0, microsecond=0)
NOW = NOON.timestamp()
DAY = NOON.strftime("%Y%m%d")
NEXT_DAY = (NOON + timedelta(days=1)).strftime("%Y%m%d")


@pytest.fixture
def paid(sqlite_engine: Engine, r: redis.Redis, plans: Plans) -> Customer:
    return make_customer(sqlite_engine, r, plans, plan="paid", usd=100)


async def admit(
    adm: Admission,
    c: Customer,
    rid: str,
    prompt: int,
    max_tokens: int,
    tag: str | None = None,
    now: float = NOW,
) -> Admitted | Refused:
    return await adm.admit(
        api_key=c.key,
        request_id=rid,
        model=MODEL,
        prompt_tokens=prompt,
        max_tokens=max_tokens,
        customer_tag=tag,
        now=now,
    )


def stream(r: redis.Redis) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _id, fields in r.xrange(rk.USAGE_STREAM)
    ]


async def test_admit_reserves_prompt_and_max_tokens(
    admission: Admission, paid: Customer, r: redis.Redis
) -> None:
    result = await admit(admission, paid, "r1", 100, 500)
    assert isinstance(result, Admitted)
    assert (result.account_id, result.key_id, result.max_tokens) == (
        paid.account_id,
        paid.key_id,
        500,
    )
    reserved = 100 * IN + 500 * OUT
    assert redis_int(r, rk.balance(paid.account_id)) == 100 * USD - reserved
    assert redis_int(r, rk.day(paid.account_id, DAY)) == 600
    h = result.headers
    assert h["x-ratelimit-limit-requests"] == "600"
    assert h["x-ratelimit-remaining-requests"] == "599"
    assert h["x-ratelimit-reset-requests"] == "100ms"
    # paid plan has no daily cap: token headers are what the credits afford at this model
    assert h["x-ratelimit-limit-tokens"] == str(100 * USD // OUT)
    assert h["x-ratelimit-remaining-tokens"] == str((100 * USD - reserved) // OUT)
    assert h["x-ratelimit-reset-tokens"] == "12h0m0s"


async def test_settle_bills_exact_usage_and_refunds(
    admission: Admission, paid: Customer, r: redis.Redis
) -> None:
    await admit(admission, paid, "r1", 100, 500, tag="acme")
    assert await admission.settle(
        request_id="r1", prompt_tokens=97, completion_tokens=301, provider_id="prov-1", now=NOW + 3
    )
    cost = 97 * IN + 301 * OUT  # 699,000: not a multiple of 100 nUSD... check split anyway
    assert redis_int(r, rk.balance(paid.account_id)) == 100 * USD - cost
    assert redis_int(r, rk.day(paid.account_id, DAY)) == 97 + 301
    assert r.hget(rk.tag_day(paid.account_id, DAY), "acme") == b"398"
    assert not r.exists(rk.hold("r1")) and r.zcard(rk.HOLDS) == 0
    [event] = stream(r)
    provider = cost * 95 // 100
    assert event == {
        "request_id": "r1",
        "account_id": str(paid.account_id),
        "key_id": str(paid.key_id),
        "customer_tag": "acme",
        "model": MODEL.id,
        "provider_id": "prov-1",
        "prompt_tokens": "97",
        "completion_tokens": "301",
        "input_nusd_per_token": str(IN),
        "output_nusd_per_token": str(OUT),
        "cost_nusd": str(cost),
        "provider_share_nusd": str(provider),
        "platform_share_nusd": str(cost - provider),
        "outcome": "settled",
        "usage_day": DAY,
        "created_at_ms": str(int(NOW * 1000)),
        "settled_at_ms": str(int((NOW + 3) * 1000)),
        "reported_completion_tokens": "",  # not given: unknown
    }
    # the script writes the usage record's fields, in its order (the Lua is formatted from
    # kernel.usage_event.FIELDS), and the record reads them back unchanged
    assert list(event) == list(FIELDS)
    assert UsageRecord.from_stream(event).to_stream() == event


async def test_split_is_exact_in_integers(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, usd=1)
    odd = MODEL.model_validate(
        {
            **MODEL.model_dump(by_alias=True),
            "input_usd_per_1m": "0.007",
            "output_usd_per_1m": "0.013",
        }
    )
    await admission.admit(
        api_key=c.key,
        request_id="odd",
        model=odd,
        prompt_tokens=3,
        max_tokens=2,
        customer_tag=None,
        now=NOW,
    )
    await admission.settle(request_id="odd", prompt_tokens=3, completion_tokens=2, provider_id="p")
    [event] = stream(r)
    # cost 3 × 7 + 2 × 13 = 47 nUSD: 95% is 44.65, so the provider gets 44 and the platform 3
    assert (event["cost_nusd"], event["provider_share_nusd"], event["platform_share_nusd"]) == (
        "47",
        "44",
        "3",
    )


async def test_a_report_above_the_reservation_is_billed_and_counted(
    admission: Admission, paid: Customer, r: redis.Redis
) -> None:
    """Never clipped silently: the engine's count is billed (the balance allows it), the
    caps count it, the overrun is counted in dg:overruns and reported to the caller."""
    await admit(admission, paid, "r1", 10, 20)
    settled = await admission.settle_usage(
        request_id="r1", prompt_tokens=50, completion_tokens=999, provider_id="p"
    )
    assert settled == Settlement(True, overrun_tokens=40 + 979, unbilled_tokens=0)
    [event] = stream(r)
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("50", "999")
    assert event["cost_nusd"] == str(50 * IN + 999 * OUT)
    assert redis_int(r, rk.balance(paid.account_id)) == 100 * USD - (50 * IN + 999 * OUT)
    assert redis_int(r, rk.day(paid.account_id, DAY)) == 50 + 999
    assert r.hgetall("dg:overruns") == {
        b"requests": b"1",
        b"tokens": b"1019",
        b"unbilled_tokens": b"0",
    }
    # a report within the reservation is no overrun
    await admit(admission, paid, "r2", 10, 20)
    assert await admission.settle_usage(
        request_id="r2", prompt_tokens=10, completion_tokens=20, provider_id="p"
    ) == Settlement(True)


async def test_an_overrun_the_balance_cannot_pay_stops_at_zero(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, plan="paid")
    svc.grant_credits(sqlite_engine, r, account_id=c.account_id, amount_nusd=10 * IN + 30 * OUT)
    assert isinstance(await admit(admission, c, "a", 10, 20), Admitted)
    settled = await admission.settle_usage(
        request_id="a", prompt_tokens=10, completion_tokens=100, provider_id="p"
    )
    # 30 output tokens were paid for (20 reserved + 10 the balance held); 70 were not
    assert settled == Settlement(True, overrun_tokens=80, unbilled_tokens=70)
    assert redis_int(r, rk.balance(c.account_id)) == 0
    [event] = stream(r)
    assert (event["prompt_tokens"], event["completion_tokens"]) == ("10", "30")
    assert event["cost_nusd"] == str(10 * IN + 30 * OUT)
    assert r.hget("dg:overruns", "unbilled_tokens") == b"70"


async def test_completions_reserve_max_tokens_each(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    """Four prompts x n=2: eight completions, each up to max_tokens; where the balance or
    the cap cannot hold that, max_tokens is lowered per completion so that all of it fits."""
    c = make_customer(sqlite_engine, r, plans, usd=100, tokens_per_day=10_000)
    result = await admission.admit(api_key=c.key, request_id="a", model=MODEL, prompt_tokens=56,
                                   max_tokens=16, customer_tag=None, now=NOW,
                                   completions=8)  # fmt: skip
    assert isinstance(result, Admitted) and result.max_tokens == 16
    assert redis_int(r, rk.day(c.account_id, DAY)) == 56 + 8 * 16
    assert redis_int(r, rk.balance(c.account_id)) == 100 * USD - 56 * IN - 8 * 16 * OUT
    # the engine reports all eight completions: billed, no overrun
    assert await admission.settle_usage(
        request_id="a", prompt_tokens=56, completion_tokens=8 * 16, provider_id="p"
    ) == Settlement(True)
    assert redis_int(r, rk.balance(c.account_id)) == 100 * USD - 56 * IN - 8 * 16 * OUT
    # the cap: 10,000 - 184 used; 9,000 asked per completion of 4 is lowered to fit
    capped = await admission.admit(api_key=c.key, request_id="b", model=MODEL, prompt_tokens=16,
                                   max_tokens=9000, customer_tag=None, now=NOW,
                                   completions=4)  # fmt: skip
    assert isinstance(capped, Admitted)
    assert capped.max_tokens == (10_000 - 184 - 16) // 4
    # the balance: what it affords after the prompt, shared among the completions
    d = make_customer(sqlite_engine, r, plans, plan="paid")
    svc.grant_credits(sqlite_engine, r, account_id=d.account_id, amount_nusd=10 * IN + 35 * OUT)
    poor = await admission.admit(api_key=d.key, request_id="c", model=MODEL, prompt_tokens=10,
                                 max_tokens=100, customer_tag=None, now=NOW,
                                 completions=4)  # fmt: skip
    assert isinstance(poor, Admitted) and poor.max_tokens == 8
    assert redis_int(r, rk.balance(d.account_id)) == 3 * OUT
    # three output tokens left cannot give four completions one token each: 402
    refused = await admission.admit(api_key=d.key, request_id="d", model=MODEL, prompt_tokens=0,
                                    max_tokens=1, customer_tag=None, now=NOW,
                                    completions=4)  # fmt: skip
    assert isinstance(refused, Refused) and refused.code == "insufficient_credits"


async def test_reserve_at_the_highest_price_and_bill_at_the_servers(
    admission: Admission, paid: Customer, r: redis.Redis
) -> None:
    """A request that may go to a provider above the catalog price reserves at that price;
    it is billed at the price of the provider that served, never above the reservation."""
    high = (IN * 2, OUT * 2)
    result = await admission.admit(api_key=paid.key, request_id="r1", model=MODEL,
                                   prompt_tokens=10, max_tokens=20, customer_tag=None, now=NOW,
                                   price=high)  # fmt: skip
    assert isinstance(result, Admitted)
    assert redis_int(r, rk.balance(paid.account_id)) == 100 * USD - (10 * IN + 20 * OUT) * 2
    served = (IN * 3 // 2, OUT * 3 // 2)
    await admission.settle(
        request_id="r1", prompt_tokens=10, completion_tokens=5, provider_id="p", price=served
    )
    await admit(admission, paid, "r2", 10, 20)  # reserved at the catalog price
    await admission.settle(  # a price above the reservation is capped at it
        request_id="r2", prompt_tokens=10, completion_tokens=5, provider_id="p", price=high
    )
    first, second = stream(r)
    cost = 10 * served[0] + 5 * served[1]
    assert (first["input_nusd_per_token"], first["output_nusd_per_token"]) == tuple(
        str(p) for p in served
    )
    assert first["cost_nusd"] == str(cost)
    assert (second["input_nusd_per_token"], second["output_nusd_per_token"]) == (str(IN), str(OUT))
    assert second["cost_nusd"] == str(10 * IN + 5 * OUT)
    assert redis_int(r, rk.balance(paid.account_id)) == 100 * USD - cost - (10 * IN + 5 * OUT)


async def test_settle_is_idempotent(admission: Admission, paid: Customer, r: redis.Redis) -> None:
    await admit(admission, paid, "r1", 10, 20)
    results = await asyncio.gather(
        *[
            admission.settle(
                request_id="r1", prompt_tokens=10, completion_tokens=5, provider_id="p"
            )
            for _ in range(5)
        ]
    )
    assert sorted(results) == [False] * 4 + [True]
    assert not await admission.settle(
        request_id="unknown", prompt_tokens=1, completion_tokens=1, provider_id="p"
    )
    assert r.xlen(rk.USAGE_STREAM) == 1
    assert redis_int(r, rk.balance(paid.account_id)) == 100 * USD - (10 * IN + 5 * OUT)
    # a settled request id cannot be admitted again
    again = await admit(admission, paid, "r1", 1, 1)
    assert isinstance(again, Refused) and again.code == "duplicate_request_id"


async def test_unknown_malformed_and_missing_keys(admission: Admission, paid: Customer) -> None:
    for key in ("", "Bearer x", "dgpu-" + "A" * 43, paid.key + "x"):
        result = await admission.admit(
            api_key=key,
            request_id="r",
            model=MODEL,
            prompt_tokens=1,
            max_tokens=1,
            customer_tag=None,
        )
        assert isinstance(result, Refused)
        assert (result.status, result.type, result.code) == (401, "auth", "invalid_api_key")
        assert result.headers == {}


async def test_suspended_account_is_refused(
    sqlite_engine: Engine, r: redis.Redis, admission: Admission, paid: Customer
) -> None:
    svc.set_status(sqlite_engine, r, account_id=paid.account_id, status="suspended")
    result = await admit(admission, paid, "r", 1, 1)
    assert isinstance(result, Refused)
    assert (result.status, result.type, result.code) == (401, "auth", "account_disabled")


async def test_daily_cap_lowers_max_tokens_then_refuses(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, usd=100, tokens_per_day=1000)
    late = NOON.replace(hour=23, minute=59).timestamp()
    first = await admit(admission, c, "a", 100, 2000, now=late)
    assert isinstance(first, Admitted) and first.max_tokens == 900
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert first.headers["x-ratelimit-remaining-tokens"] == "0"
    assert first.headers["x-ratelimit-reset-tokens"] == "1m0s"
    refused = await admit(admission, c, "b", 0, 1, now=late)
    assert isinstance(refused, Refused)
    assert (refused.status, refused.type, refused.code) == (429, "rate_limit", "daily_cap_exceeded")
    assert refused.retry_after_s == 60 and refused.headers["retry-after"] == "60"
    assert refused.headers["x-should-retry"] == "false"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    # settling with less usage frees cap: 100 + 400 used, so 500 remain
    await admission.settle(
        request_id="a", prompt_tokens=100, completion_tokens=400, provider_id="p", now=late + 1
    )
    third = await admit(admission, c, "c", 200, 1000, now=late + 2)
    assert isinstance(third, Admitted) and third.max_tokens == 300
    # a prompt that does not fit with one output token is refused, not truncated
    fourth = await admit(admission, c, "d", 0, 5, now=late + 3)
    assert isinstance(fourth, Refused) and fourth.code == "daily_cap_exceeded"
    # the cap resets at 00:00 UTC
    next_day = (NOON + timedelta(hours=12, seconds=1)).timestamp()
    fifth = await admit(admission, c, "e", 100, 2000, now=next_day)
    assert isinstance(fifth, Admitted) and fifth.max_tokens == 900
    assert redis_int(r, rk.day(c.account_id, NEXT_DAY)) == 1000
    assert redis_int(r, rk.day(c.account_id, DAY)) == 1000


async def test_free_plan_cap_applies(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, plan="free")
    result = await admit(admission, c, "a", 1000, 500_000)
    assert isinstance(result, Admitted) and result.max_tokens == 199_000
    assert result.headers["x-ratelimit-limit-tokens"] == "200000"
    assert result.headers["x-ratelimit-limit-requests"] == "60"


async def test_customer_tag_caps(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, usd=100, tokens_per_day=10_000)
    svc.set_customer_cap(
        sqlite_engine, r, account_id=c.account_id, customer_tag="acme", tokens_per_day=300
    )
    svc.set_customer_cap(
        sqlite_engine, r, account_id=c.account_id, customer_tag="*", tokens_per_day=1000
    )
    a = await admit(admission, c, "a", 100, 5000, tag="acme")
    assert isinstance(a, Admitted) and a.max_tokens == 200
    assert a.headers["x-ratelimit-limit-tokens"] == "300"
    b = await admit(admission, c, "b", 1, 5, tag="acme")
    assert isinstance(b, Refused) and b.code == "daily_cap_exceeded"
    assert "customer 'acme'" in b.message
    other = await admit(admission, c, "c", 100, 5000, tag="globex")  # the '*' cap
    assert isinstance(other, Admitted) and other.max_tokens == 900
    untagged = await admit(admission, c, "d", 100, 5000)  # only the account cap
    assert isinstance(untagged, Admitted) and untagged.max_tokens == 5000
    assert untagged.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 300 - 1000 - 5100)
    too_long = await admit(admission, c, "e", 1, 1, tag="x" * 257)
    assert isinstance(too_long, Refused) and too_long.status == 400


async def test_the_customers_own_cap_only_lowers_the_cap_that_applies(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, usd=100, tokens_per_day=1000)
    own = partial(svc.set_own_cap, sqlite_engine, r, account_id=c.account_id)
    own(tokens_per_day=300)
    a = await admit(admission, c, "a", 100, 5000)
    assert isinstance(a, Admitted) and a.max_tokens == 200
    assert a.headers["x-ratelimit-limit-tokens"] == "300"
    refused = await admit(admission, c, "b", 1, 1)
    assert isinstance(refused, Refused) and refused.code == "daily_cap_exceeded"
    own(tokens_per_day=50_000)  # above the operator's 1,000: the 1,000 still applies
    b = await admit(admission, c, "c", 100, 5000)
    assert isinstance(b, Admitted) and b.max_tokens == 1000 - 300 - 100
    own(tokens_per_day=None)
    uncapped = make_customer(sqlite_engine, r, plans, usd=100)  # paid: credits only
    svc.set_own_cap(sqlite_engine, r, account_id=uncapped.account_id, tokens_per_day=400)
    d = await admit(admission, uncapped, "d", 100, 5000)
    assert isinstance(d, Admitted) and d.max_tokens == 300
    with pytest.raises(svc.AccountError):
        own(tokens_per_day=-1)
    with pytest.raises(svc.AccountError):
        own(tokens_per_day=svc.MAX_TOKENS_PER_DAY + 1)


async def test_a_keys_own_cap_counts_the_days_use_before_it_was_set(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, usd=100)  # paid: no account cap
    other = svc.create_key(sqlite_engine, r, account_id=c.account_id)
    first = await admit(admission, c, "a", 100, 200)  # 300 tokens on this key, uncapped
    assert isinstance(first, Admitted) and first.max_tokens == 200
    svc.set_key_cap(sqlite_engine, r, key_id=c.key_id, account_id=c.account_id,
                    tokens_per_day=500)  # fmt: skip
    second = await admit(admission, c, "b", 100, 5000)  # 200 left of the key's 500
    assert isinstance(second, Admitted) and second.max_tokens == 100
    assert second.headers["x-ratelimit-limit-tokens"] == "500"
    refused = await admit(admission, c, "c", 1, 1)
    assert isinstance(refused, Refused) and refused.code == "daily_cap_exceeded"
    assert "API key" in refused.message
    # the account's other key is not held by this key's cap
    free_key = Customer(c.account_id, other.key or "", other.id)
    assert isinstance(await admit(admission, free_key, "d", 100, 5000), Admitted)
    # settling with less usage frees the key's room
    await admission.settle(request_id="b", prompt_tokens=100, completion_tokens=0,
                           provider_id="p")  # fmt: skip
    third = await admit(admission, c, "e", 50, 5000)
    assert isinstance(third, Admitted) and third.max_tokens == 50
    # another account's key is "no key"; a revoked key's record is not made again by a cap
    stranger = make_customer(sqlite_engine, r, plans, usd=1)
    with pytest.raises(svc.AccountError):
        svc.set_key_cap(sqlite_engine, r, key_id=c.key_id, account_id=stranger.account_id,
                        tokens_per_day=1)  # fmt: skip
    svc.revoke_key(sqlite_engine, r, key_id=other.id)
    svc.set_key_cap(sqlite_engine, r, key_id=other.id, account_id=c.account_id,
                    tokens_per_day=10)  # fmt: skip
    assert not r.exists(rk.api_key(hash_key(other.key or "")))
    gone = await admit(admission, free_key, "f", 1, 1)
    assert isinstance(gone, Refused) and gone.status == 401


async def test_credits_lower_max_tokens_then_402(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, plan="paid")
    svc.grant_credits(
        sqlite_engine, r, account_id=c.account_id, amount_nusd=100 * IN + 50 * OUT + 1999
    )
    result = await admit(admission, c, "a", 100, 1000)
    assert isinstance(result, Admitted) and result.max_tokens == 50  # 1999 nUSD is < 1 token
    assert redis_int(r, rk.balance(c.account_id)) == 1999
    refused = await admit(admission, c, "b", 0, 10)
    assert isinstance(refused, Refused)
    assert (refused.status, refused.type, refused.code) == (402, "billing", "insufficient_credits")
    assert refused.retry_after_s is None
    assert "x-ratelimit-limit-requests" in refused.headers
    # a prompt the balance can pay but not one output token on top of it
    await admission.settle(request_id="a", prompt_tokens=100, completion_tokens=49, provider_id="p")
    assert redis_int(r, rk.balance(c.account_id)) == 1999 + OUT
    edge = await admit(admission, c, "c", 1, 10)
    assert isinstance(edge, Admitted) and edge.max_tokens == 1
    assert redis_int(r, rk.balance(c.account_id)) == 1999 + OUT - IN - OUT


async def test_requests_per_minute(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, usd=10, rpm=5)
    remaining = []
    for i in range(5):
        result = await admit(admission, c, f"r{i}", 1, 1)
        assert isinstance(result, Admitted)
        remaining.append(result.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["4", "3", "2", "1", "0"]
    assert result.headers["x-ratelimit-reset-requests"] == "1m0s"
    refused = await admit(admission, c, "r5", 1, 1)
    assert isinstance(refused, Refused)
    assert (refused.status, refused.type, refused.code) == (
        429,
        "rate_limit",
        "rate_limit_exceeded",
    )
    assert refused.retry_after_s == 12 and refused.headers["retry-after"] == "12"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert not r.exists(rk.hold("r5"))
    still = await admit(admission, c, "r6", 1, 1, now=NOW + 11.9)
    assert isinstance(still, Refused) and still.code == "rate_limit_exceeded"
    later = await admit(admission, c, "r7", 1, 1, now=NOW + 12)
    assert isinstance(later, Admitted)
    assert later.headers["x-ratelimit-remaining-requests"] == "0"


async def test_concurrent_admits_never_overshoot_the_cap(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, usd=100, tokens_per_day=2000)
    results = await asyncio.gather(*[admit(admission, c, f"r{i}", 10, 100) for i in range(50)])
    admitted = [x for x in results if isinstance(x, Admitted)]
    refused = [x for x in results if isinstance(x, Refused)]
    reserved = sum(10 + x.max_tokens for x in admitted)
    assert reserved == 2000  # 18 × 110 + one lowered to 10 + 10
    assert sorted(x.max_tokens for x in admitted)[0] == 10
    assert {x.code for x in refused} == {"daily_cap_exceeded"}
    assert len(admitted) + len(refused) == 50
    assert redis_int(r, rk.day(c.account_id, DAY)) == 2000


async def test_concurrent_admits_never_overspend_credits(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, plan="paid")
    per_request = 10 * IN + 100 * OUT
    budget = 20 * per_request + per_request // 2
    svc.grant_credits(sqlite_engine, r, account_id=c.account_id, amount_nusd=budget)
    results = await asyncio.gather(*[admit(admission, c, f"r{i}", 10, 100) for i in range(50)])
    admitted = [x for x in results if isinstance(x, Admitted)]
    spent = sum(10 * IN + x.max_tokens * OUT for x in admitted)
    assert spent <= budget
    assert len(admitted) == 21 and sorted(x.max_tokens for x in admitted)[0] == 47
    # the 21st is lowered to what the last half request's credits afford: (105,000 − 10,000)
    # / 2,000 = 47 output tokens
    assert redis_int(r, rk.balance(c.account_id)) == budget - spent >= 0
    assert all(x.code == "insufficient_credits" for x in results if isinstance(x, Refused))
    settled = await asyncio.gather(
        *[
            admission.settle(
                request_id=f"r{i}", prompt_tokens=10, completion_tokens=100, provider_id="p"
            )
            for i in range(50)
        ]
    )
    assert sum(settled) == 21
    assert redis_int(r, rk.balance(c.account_id)) == budget - spent


async def test_reaper_settles_expired_holds_once(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, ar: object
) -> None:
    c = make_customer(sqlite_engine, r, plans, usd=1)
    adm = Admission(ar, plans, hold_ttl_s=10)  # type: ignore[arg-type]
    await admit(adm, c, "stuck", 10, 100)
    await admit(adm, c, "live", 10, 100, now=NOW + 8)
    assert await adm.reap(now=NOW + 9) == 0
    assert await adm.reap(now=NOW + 10) == 1
    assert redis_int(r, rk.day(c.account_id, DAY)) == 110  # only "live" still reserved
    assert not await adm.settle(
        request_id="stuck", prompt_tokens=10, completion_tokens=100, provider_id="p"
    )
    [event] = stream(r)  # no checkpoint: nothing delivered that billing knows of, billed zero
    assert (event["request_id"], event["outcome"], event["cost_nusd"]) == ("stuck", "reaped", "0")
    # a long stream extends its hold and is not reaped
    assert await adm.extend(request_id="live", now=NOW + 15)
    assert await adm.reap(now=NOW + 20) == 0
    assert await adm.settle(
        request_id="live", prompt_tokens=10, completion_tokens=3, provider_id="p"
    )
    assert await adm.reap(now=NOW + 10_000) == 0
    assert redis_int(r, rk.balance(c.account_id)) == USD - (10 * IN + 3 * OUT)
    assert not await adm.extend(request_id="live")


async def test_cold_redis_answers_503(paid: Customer, r: redis.Redis, admission: Admission) -> None:
    r.delete(rk.READY)
    result = await admit(admission, paid, "r", 1, 1)
    assert isinstance(result, Refused)
    assert (result.status, result.type, result.code) == (
        503,
        "service_unavailable",
        "billing_unavailable",
    )
    assert result.retry_after_s == 1


async def test_redis_down_answers_503(paid: Customer, plans: Plans) -> None:
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    dead = aredis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    result = await Admission(dead, plans).admit(
        api_key=paid.key,
        request_id="r",
        model=MODEL,
        prompt_tokens=1,
        max_tokens=1,
        customer_tag=None,
    )
    assert isinstance(result, Refused) and result.status == 503
    await dead.aclose()


async def test_bad_arguments(admission: Admission, paid: Customer) -> None:
    with pytest.raises(ValueError):
        await admit(admission, paid, "r", 1, 0)
    with pytest.raises(ValueError):
        await admit(admission, paid, "r", -1, 1)
    with pytest.raises(ValueError):
        await admit(admission, paid, "", 1, 1)


@pytest.mark.parametrize("completions", [1, 3, 8])
@pytest.mark.parametrize("credit_tokens", [5, 40, 10_000])  # output tokens the grant affords
@pytest.mark.parametrize("reported", ["none", "within", "all", "over"])
async def test_the_balance_moves_by_the_usage_billed_and_never_below_zero(
    sqlite_engine: Engine,
    r: redis.Redis,
    plans: Plans,
    admission: Admission,
    completions: int,
    credit_tokens: int,
    reported: str,
) -> None:
    """Across completions, balances and reports: the reservation fits the balance and holds
    max_tokens for every completion; settlement bills exactly the tokens in the usage event
    at its prices (all reported tokens wherever the balance allows) and never goes below 0."""
    c = make_customer(sqlite_engine, r, plans, plan="paid")
    granted_nusd = 7 * IN + credit_tokens * OUT
    svc.grant_credits(sqlite_engine, r, account_id=c.account_id, amount_nusd=granted_nusd)
    result = await admission.admit(api_key=c.key, request_id="x", model=MODEL, prompt_tokens=7,
                                   max_tokens=30, customer_tag=None, now=NOW,
                                   completions=completions)  # fmt: skip
    if credit_tokens < completions:
        assert isinstance(result, Refused) and result.code == "insufficient_credits"
        return
    assert isinstance(result, Admitted)
    held = result.max_tokens * completions
    assert result.max_tokens == min(30, credit_tokens // completions) and held <= credit_tokens
    assert redis_int(r, rk.balance(c.account_id)) == granted_nusd - 7 * IN - held * OUT >= 0
    completion = {"none": 0, "within": held // 2, "all": held, "over": held + 25}[reported]
    settled = await admission.settle_usage(
        request_id="x", prompt_tokens=7, completion_tokens=completion, provider_id="p"
    )
    [event] = stream(r)
    billed = int(event["completion_tokens"])
    assert int(event["cost_nusd"]) == 7 * IN + billed * OUT
    balance = redis_int(r, rk.balance(c.account_id))
    assert balance == granted_nusd - int(event["cost_nusd"]) >= 0
    affordable = credit_tokens  # output tokens the grant pays for after the prompt
    assert billed == min(completion, affordable)
    assert settled.overrun_tokens == max(completion - held, 0)
    assert settled.unbilled_tokens == completion - billed
