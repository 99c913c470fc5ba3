"""Day rollover at 00:00 UTC with an injected clock: daily caps (per account and per customer
tag) reset by themselves, and the refusal's Retry-After counts down to 00:00 UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from billing import accounts as svc
from billing.admission import Admission, Admitted, Refused
from billing.meter import UsageMeter
from billing.plans import Plans
from billing.rebuild import rebuild
from core.schema import UsageEvent
from kernel import redis_keys as rk
from tests.billing.conftest import MODEL, Customer, make_customer, redis_int

# Day D starts two days ahead (Redis expires day counters by the wall clock, so test days must
# not lie in the past). MIDNIGHT is 00:00:00 UTC of day D + 1.
DAY_START = (datetime.now(UTC) + timedelta(days=2)).replace(
    hour=0, minute=0, second=0, microsecond=0
)
MIDNIGHT = DAY_START + timedelta(days=1)
D = DAY_START.strftime("%Y%m%d")
D1 = MIDNIGHT.strftime("%Y%m%d")


def at(hh: int, mm: int, ss: float) -> float:
    """Epoch seconds of hh:mm:ss UTC on day D."""
    return (DAY_START + timedelta(hours=hh, minutes=mm, seconds=ss)).timestamp()


NEXT_MIDNIGHT = MIDNIGHT.timestamp()


async def admit(
    adm: Admission,
    c: Customer,
    rid: str,
    prompt: int,
    max_tokens: int,
    now: float,
    tag: str | None = None,
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


async def test_capped_at_235959_admitted_at_midnight(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, usd=100, tokens_per_day=1000)
    first = await admit(admission, c, "last", 100, 5000, at(23, 59, 59))
    assert isinstance(first, Admitted) and first.max_tokens == 900
    await admission.settle(
        request_id="last",
        prompt_tokens=100,
        completion_tokens=900,
        provider_id="p",
        now=at(23, 59, 59.2),
    )
    refused = await admit(admission, c, "late", 1, 1, at(23, 59, 59.5))
    assert isinstance(refused, Refused)
    assert (refused.status, refused.code) == (429, "daily_cap_exceeded")
    assert refused.retry_after_s == 1 and refused.headers["retry-after"] == "1"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert refused.headers["x-ratelimit-reset-tokens"] == "500ms"
    last_ms = await admit(admission, c, "later", 1, 1, at(23, 59, 59.999))
    assert isinstance(last_ms, Refused) and last_ms.retry_after_s == 1

    fresh = await admit(admission, c, "fresh", 100, 5000, NEXT_MIDNIGHT)
    assert isinstance(fresh, Admitted) and fresh.max_tokens == 900
    assert fresh.headers["x-ratelimit-limit-tokens"] == "1000"
    assert fresh.headers["x-ratelimit-remaining-tokens"] == "0"
    assert fresh.headers["x-ratelimit-reset-tokens"] == "24h0m0s"
    assert redis_int(r, rk.day(c.account_id, D)) == 1000
    assert redis_int(r, rk.day(c.account_id, D1)) == 1000
    # no job resets anything: day D's counter expires by itself a day after D ends
    grace_ms = 86_400_000
    assert r.pexpiretime(rk.day(c.account_id, D)) == int(NEXT_MIDNIGHT * 1000) + grace_ms


async def test_retry_after_counts_down_to_midnight(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, usd=100, tokens_per_day=500)
    full = await admit(admission, c, "full", 100, 400, at(12, 0, 0))
    assert isinstance(full, Admitted) and full.max_tokens == 400
    expected = [
        (at(12, 0, 0), 43_200, "12h0m0s"),
        (at(18, 30, 0), 19_800, "5h30m0s"),
        (at(23, 0, 0), 3_600, "1h0m0s"),
        (at(23, 59, 0), 60, "1m0s"),
        (at(23, 59, 58.75), 2, "1.25s"),
        (at(23, 59, 59.999), 1, "1ms"),
    ]
    for i, (now, seconds, reset) in enumerate(expected):
        refused = await admit(admission, c, f"x{i}", 1, 1, now)
        assert isinstance(refused, Refused) and refused.code == "daily_cap_exceeded"
        assert refused.retry_after_s == seconds
        assert refused.headers["retry-after"] == str(seconds)
        assert refused.headers["x-ratelimit-reset-tokens"] == reset
        assert f"(in {reset})" in refused.message
    assert isinstance(await admit(admission, c, "next", 100, 400, NEXT_MIDNIGHT), Admitted)


async def test_customer_tag_caps_reset_at_midnight(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, usd=100)  # no account cap: only the tags'
    svc.set_customer_cap(
        sqlite_engine, r, account_id=c.account_id, customer_tag="acme", tokens_per_day=300
    )
    svc.set_customer_cap(
        sqlite_engine, r, account_id=c.account_id, customer_tag="*", tokens_per_day=500
    )
    late = at(23, 59, 59)
    acme = await admit(admission, c, "a1", 100, 1000, late, tag="acme")
    globex = await admit(admission, c, "g1", 100, 1000, late, tag="globex")
    assert isinstance(acme, Admitted) and acme.max_tokens == 200
    assert isinstance(globex, Admitted) and globex.max_tokens == 400
    for rid, tag in (("a2", "acme"), ("g2", "globex")):
        refused = await admit(admission, c, rid, 1, 1, at(23, 59, 59.9), tag=tag)
        assert isinstance(refused, Refused) and refused.code == "daily_cap_exceeded"
        assert f"customer '{tag}'" in refused.message and refused.retry_after_s == 1
    untagged = await admit(admission, c, "u1", 100, 1000, at(23, 59, 59.9))
    assert isinstance(untagged, Admitted) and untagged.max_tokens == 1000

    acme = await admit(admission, c, "a3", 100, 1000, NEXT_MIDNIGHT, tag="acme")
    globex = await admit(admission, c, "g3", 100, 1000, NEXT_MIDNIGHT, tag="globex")
    assert isinstance(acme, Admitted) and acme.max_tokens == 200
    assert acme.headers["x-ratelimit-limit-tokens"] == "300"
    assert isinstance(globex, Admitted) and globex.max_tokens == 400
    assert r.hgetall(rk.tag_day(c.account_id, D1)) == {b"acme": b"300", b"globex": b"500"}
    assert r.hgetall(rk.tag_day(c.account_id, D)) == {b"acme": b"300", b"globex": b"500"}


async def test_request_open_across_midnight_counts_on_its_own_day(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(sqlite_engine, r, plans, usd=100, tokens_per_day=1000)
    svc.set_customer_cap(
        sqlite_engine, r, account_id=c.account_id, customer_tag="acme", tokens_per_day=800
    )
    straddler = await admit(admission, c, "straddler", 100, 900, at(23, 59, 58), tag="acme")
    assert isinstance(straddler, Admitted) and straddler.max_tokens == 700
    new_day = await admit(admission, c, "new-day", 100, 5000, NEXT_MIDNIGHT + 1, tag="acme")
    assert isinstance(new_day, Admitted) and new_day.max_tokens == 700  # D's hold not counted
    # settles after midnight: billed on day D, and the refund goes back to day D
    await admission.settle(
        request_id="straddler",
        prompt_tokens=100,
        completion_tokens=50,
        provider_id="p",
        now=NEXT_MIDNIGHT + 2,
    )
    assert redis_int(r, rk.day(c.account_id, D)) == 150
    assert redis_int(r, rk.day(c.account_id, D1)) == 800
    assert r.hget(rk.tag_day(c.account_id, D), "acme") == b"150"
    assert r.hget(rk.tag_day(c.account_id, D1), "acme") == b"800"

    meter = UsageMeter(sqlite_engine, r, consumer="rollover")
    assert meter.drain_all() == 1
    with Session(sqlite_engine) as session:
        row = session.query(UsageEvent).one()
        assert row.usage_day == DAY_START.date().isoformat()
    # a rebuild after midnight restores the new day's use: nothing of day D, plus the open hold
    r.delete(rk.day(c.account_id, D1), rk.tag_day(c.account_id, D1))
    rebuild(sqlite_engine, r, meter=meter, now=NEXT_MIDNIGHT + 3)
    assert redis_int(r, rk.day(c.account_id, D1)) == 800
    assert r.hget(rk.tag_day(c.account_id, D1), "acme") == b"800"
