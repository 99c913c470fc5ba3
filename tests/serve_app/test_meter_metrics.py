"""The billing actor's gauge readings, against a real Redis and real SQLite: the usage
stream's backlog and flush lag, providers by tier and status, providers serving, payouts."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from billing import redis_keys as rk
from billing.accounts import create_account
from billing.db import make_engine, migrate
from billing.plans import load_plans
from billing.schema import Payout, ProviderStatus
from cluster.registry import create_provider, set_status
from serve_app.meter_metrics import (
    read_backlog,
    read_payouts,
    read_registered,
    read_serving,
)
from serve_app.replica_stats import replicas_key

REDIS_URL = os.environ.get("DARKGPU_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REPO = Path(__file__).resolve().parents[2]
NOW_MS = 1_800_000_000_000


@pytest.fixture
def r() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'metrics.db'}")
    migrate(eng)
    yield eng
    eng.dispose()


def test_backlog_of_an_empty_stream_is_zero(r):
    assert read_backlog(r, NOW_MS) == (0, 0, 0, 0.0)


def test_backlog_counts_unflushed_pending_and_dead_events_and_the_oldest_ones_age(r):
    r.xgroup_create(rk.USAGE_STREAM, rk.METER_GROUP, id="0", mkstream=True)
    r.xadd(rk.USAGE_STREAM, {"request_id": "a"}, id=f"{NOW_MS - 7_500}-0")
    r.xadd(rk.USAGE_STREAM, {"request_id": "b"}, id=f"{NOW_MS - 1_000}-0")
    r.xadd(rk.USAGE_STREAM, {"request_id": "c"}, id=f"{NOW_MS - 1_000}-1")
    r.xreadgroup(rk.METER_GROUP, "meter-1", {rk.USAGE_STREAM: ">"}, count=2)
    r.xadd(rk.DEAD_STREAM, {"request_id": "x", "error": "unknown account"})
    backlog = read_backlog(r, NOW_MS)
    assert (backlog.length, backlog.pending, backlog.dead) == (3, 2, 1)
    assert backlog.oldest_age_s == 7.5
    # the meter acknowledges and deletes what the ledger took: the next oldest counts
    r.xack(rk.USAGE_STREAM, rk.METER_GROUP, f"{NOW_MS - 7_500}-0")
    r.xdel(rk.USAGE_STREAM, f"{NOW_MS - 7_500}-0")
    assert read_backlog(r, NOW_MS) == (2, 1, 1, 1.0)


def test_providers_by_tier_and_status_zeros_included(engine):
    account = create_account(engine, None, load_plans(REPO / "configs" / "plans.toml"),
                             email="owner@example.com", plan="free")  # fmt: skip
    ids = [create_provider(engine, account_id=account.id, name=f"gpu{i}").provider.id
           for i in range(3)]  # fmt: skip
    set_status(engine, ids[0], ProviderStatus.online)
    set_status(engine, ids[1], ProviderStatus.online)
    counts = read_registered(engine)
    assert counts[("basic", "online")] == 2
    assert counts[("basic", "offline")] == 1
    assert counts[("verified", "online")] == 0
    assert len(counts) == 2 * len(ProviderStatus)

    payouts = [(ids[0], "2026-W40", 1_500, "paid"), (ids[1], "2026-W40", 2_000, "paid"),
               (ids[0], "2026-W41", 1_100, "failed")]  # fmt: skip
    with Session(engine) as session, session.begin():
        for provider, week, cents, status in payouts:
            payout = Payout(
                provider_id=provider,
                week=week,
                amount_cents=cents,
                status=status,
                stripe_account_id="acct_1",
                idempotency_key=provider + week,
            )
            session.add(payout)
    assert read_payouts(engine) == {"paid": (2, 3_500), "failed": (1, 1_100), "pending": (0, 0)}


def test_providers_serving_are_those_with_a_live_healthy_replica(r):
    def replica(provider: str, tier: str, expires_ms: int, **extra: object) -> str:
        stats = {"provider_id": provider, "trust_tier": tier, "expires_ms": expires_ms}
        return json.dumps({**stats, **extra})

    live = NOW_MS + 4_000
    r.hset(replicas_key("model-a"), mapping={
        "r1": replica("p1", "basic", live),
        "r2": replica("p1", "basic", live),  # a provider with two replicas counts once
        "r3": replica("p2", "verified", live),
        "r4": replica("p3", "verified", NOW_MS - 1),  # expired: its replica went away
    })  # fmt: skip
    r.hset(replicas_key("model-b"), mapping={
        "r5": replica("p1", "basic", live),  # the same provider serving another model
        "r6": replica("p4", "basic", live, draining=True),
        "r7": replica("p5", "basic", live, healthy=False),
    })  # fmt: skip
    assert read_serving(r, NOW_MS) == {"basic": 1, "verified": 1}
    r.flushdb()
    assert read_serving(r, NOW_MS) == {"basic": 0, "verified": 0}
