"""The replicas' routing stats in Redis, as the ingress reads them (a real Redis server)."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
import redis.asyncio as aredis

from kernel.labels import TrustTier
from serve_app.replica_stats import ReplicaDirectory, parse, publish, replicas_key

REDIS_URL = os.environ.get("DARKGPU_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
async def ar():
    client = aredis.Redis.from_url(REDIS_URL)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


def stats(provider: str, tier: str = "basic", floor: int = 0, ongoing: int = 0) -> dict:
    return {"provider_id": provider, "trust_tier": tier, "price_floor_pct": floor,
            "ongoing": ongoing}  # fmt: skip


async def test_published_replicas_are_read_back_until_they_expire(ar) -> None:
    await publish(ar, "m", "r1", stats("p1"))
    await publish(ar, "m", "r2", stats("p2", "verified", 20, ongoing=3))
    directory = ReplicaDirectory(ar, ttl_s=0)
    replicas = {r.replica_id: r for r in await directory.replicas("m")}
    assert set(replicas) == {"r1", "r2"}
    assert replicas["r2"].provider_id == "p2"
    assert replicas["r2"].trust_tier is TrustTier.verified
    assert (replicas["r2"].price_floor_pct, replicas["r2"].load) == (20, 3.0)
    assert 0 < await ar.pttl(replicas_key("m")) <= 12_000
    await ar.hdel(replicas_key("m"), "r1")  # r1's entry gone, as when it expires
    await directory.replicas("m")  # answers with the last reading, and reads again
    await asyncio.sleep(0.1)
    assert [r.replica_id for r in await directory.replicas("m")] == ["r2"]
    assert await directory.replicas("other") == []


def test_expired_unreported_and_malformed_entries_are_skipped() -> None:
    now = int(time.time() * 1000)
    entries = {
        b"ok": json.dumps({**stats("p1"), "expires_ms": now + 1000}),
        b"old": json.dumps({**stats("p1"), "expires_ms": now - 1}),
        b"anon": json.dumps({"ongoing": 0, "expires_ms": now + 1000}),
        b"junk": b"{not json",
    }
    assert [r.replica_id for r in parse(entries, now)] == ["ok"]


async def test_an_unreachable_redis_leaves_the_directory_empty_not_failing() -> None:
    client = aredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        assert await ReplicaDirectory(client).replicas("m") == []
    finally:
        await client.aclose()
