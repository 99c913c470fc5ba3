"""Demand and reputation (`cluster.market`) from real usage rows: requests admitted and
settled through the admission scripts on a real Redis and drained by the meter into real
SQLite or PostgreSQL, providers registered with recorded GPUs, heartbeats and strikes as the
platform writes them."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import redis
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from agent_bootstrap.nvml import RecordedReader, detect
from billing.admission import Admission, Admitted
from billing.meter import UsageMeter
from billing.plans import Plans
from cluster import market, registry
from core.schema import ProviderStatus, UsageStrike
from kernel.money import split_cost
from tests.billing.conftest import IN, MODEL, OUT, Customer, make_customer
from tests.cluster.nvml_readings import H100, RTX_4090

NOW = datetime(2030, 1, 9, 12, 30, tzinfo=UTC)  # a Wednesday: last week is Dec 31 .. Jan 7


def provider(engine: Engine, owner: int, name: str, reading) -> str:
    new = registry.create_provider(engine, account_id=owner, name=name)
    key = base64.b64encode(X25519PrivateKey.generate().public_key().public_bytes_raw()).decode()
    body = {**detect(RecordedReader(reading)).facts(), "public_key": key}
    registry.register(engine, new.provider.id, registry.Registration.model_validate(body),
                      secret=b"secret")  # fmt: skip
    return new.provider.id


async def served(adm: Admission, c: Customer, rid: str, provider_id: str, at: datetime) -> int:
    """One request of 10 + 20 tokens settled at `at`; its provider's share."""
    now = at.timestamp()
    admitted = await adm.admit(api_key=c.key, request_id=rid, model=MODEL, prompt_tokens=10,
                               max_tokens=50, customer_tag=None, now=now)  # fmt: skip
    assert isinstance(admitted, Admitted)
    await adm.settle(request_id=rid, prompt_tokens=10, completion_tokens=20,
                     provider_id=provider_id, now=now + 1)  # fmt: skip
    return split_cost(10 * IN + 20 * OUT)[0]


async def test_demand_earnings_and_reputation_come_from_the_rows(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    c = make_customer(engine, r, plans, usd=5)
    small = provider(engine, c.account_id, "garage-4090", RTX_4090)
    big = provider(engine, c.account_id, "rack-h100", H100)
    start, end = market.last_week(NOW)
    assert (start, end) == (datetime(2029, 12, 31, tzinfo=UTC), datetime(2030, 1, 7, tzinfo=UTC))
    share = 0
    for i in range(3):  # last week: 3 on the 4090, 1 on the H100
        share = await served(admission, c, f"w{i}", small, start + timedelta(days=i, hours=1))
    await served(admission, c, "w3", big, start + timedelta(days=2, hours=2))
    # in time order (the requests-per-minute limit keeps the latest moment it saw)
    await served(admission, c, "old", big, NOW - timedelta(days=3))  # outside the day
    await served(admission, c, "d0", small, NOW - timedelta(hours=5))  # today, not this hour
    await served(admission, c, "h1", big, NOW - timedelta(minutes=20))
    await served(admission, c, "h0", small, NOW - timedelta(minutes=10))
    assert meter.drain_all() == 8

    [tiny, other] = market.demand(engine, [MODEL.id, "nobody-asks"], now=NOW)
    assert tiny == market.ModelDemand(MODEL.id, round(3 / 24, 2), round(90 / 24, 1), 2, 60, 2)
    assert other == market.ModelDemand("nobody-asks", 0, 0, 0, 0, 0)

    by_size = {e.vram_gb_per_gpu: e for e in market.gpu_earnings(engine, now=NOW)}
    assert set(by_size) == {24, 80}  # the 4090's 23.99 GiB, the H100's 79.6
    assert by_size[24].gpus == 1 and by_size[24].median_usd_per_gpu == f"{3 * share / 1e9:.2f}"
    assert by_size[80].most_usd_per_gpu == f"{share / 1e9:.2f}"

    # uptime: the hours its agent said online in, of the last 7 days (the providers were
    # made before them: the whole week counts)
    for hours_ago in (0, 0, 1, 3):  # two heartbeats in one hour count once
        registry.heartbeat(
            engine, small, ProviderStatus.online, now=NOW - timedelta(hours=hours_ago)
        )
    registry.heartbeat(engine, big, ProviderStatus.draining, now=NOW)  # not online: no hour
    with Session(engine) as session, session.begin():
        for rid, at in (("h0", NOW - timedelta(hours=1)), ("w0", NOW - timedelta(days=9))):
            strike = UsageStrike(provider_id=small, request_id=rid, model=MODEL.id,
                                 reported_tokens=50, counted_tokens=20, created_at=at)  # fmt: skip
            session.add(strike)
    record = market.reputation(engine, [small, big, "prv_unknown"], now=NOW)
    assert set(record) == {small, big}
    assert record[small] == market.Reputation(small, round(100 * 3 / 168, 1), 168, 2, 1)
    assert record[big] == market.Reputation(big, 0.0, 168, 2, 0)  # "old" and "h1"
