"""The billing actor's gauge readings, against a real Redis, SQLite and PostgreSQL: the usage
stream's backlog and flush lag, providers by tier and status, providers serving, payouts."""

from __future__ import annotations

import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from billing.accounts import create_account
from billing.plans import load_plans
from cluster.registry import ProviderTerms, create_provider, set_status
from core.schema import Payout, ProviderStatus
from kernel import redis_keys as rk
from kernel.labels import TrustTier
from serve_app.meter_metrics import (
    read_backlog,
    read_payouts,
    read_registered,
    read_serving,
)
from serve_app.pool_protocol import PoolReplica
from tests.billing import conftest as billing

# a real Redis (a test database), and SQLite and PostgreSQL, as the billing tests have them
db_url, engine, r = billing.db_url, billing.engine, billing.r
NOW_MS = 1_800_000_000_000


def test_backlog_of_an_empty_stream_is_zero(r: redis.Redis) -> None:
    assert read_backlog(r, NOW_MS) == (0, 0, 0, 0.0)


def test_backlog_counts_unflushed_pending_and_dead_events_and_the_oldest_ones_age(
    r: redis.Redis,
) -> None:
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


def test_providers_and_payouts_by_tier_and_status_zeros_included(engine: Engine) -> None:
    account = create_account(engine, None, load_plans(billing.REPO / "configs" / "plans.toml"),
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


def test_providers_serving_are_those_with_a_healthy_replica_the_pool_lists() -> None:
    def replica(name: str, provider: str, tier: str, model: str = "a", **extra: object):
        said = {"provider_id": provider, "trust_tier": tier, **extra}
        return PoolReplica(model, name, "n" * 56, said)

    basic = [
        replica("r1", "p1", "basic"),
        replica("r2", "p1", "basic"),  # a provider with two replicas counts once
        replica("r5", "p1", "basic", model="b"),  # the same provider serving another model
        replica("r6", "p4", "basic", model="b", draining=True),
        replica("r7", "p5", "basic", model="b", healthy=False),
        PoolReplica("b", "r8", "n" * 56, {"ongoing": 0}),  # names no provider
    ]
    listed = {TrustTier.basic: basic, TrustTier.verified: [replica("r3", "p2", "verified")]}
    assert read_serving(listed) == {"basic": 1, "verified": 1}
    # in the basic pool, a replica that says verified is basic
    said_verified = {TrustTier.basic: [replica("r9", "p9", "verified")]}
    assert read_serving(said_verified) == {"basic": 1, "verified": 0}
    # the registry's word wins over a node's labels: p2 is basic, p1 is paused
    registry = {
        "p1": ProviderTerms(TrustTier.basic, 0, ProviderStatus.paused),
        "p2": ProviderTerms(TrustTier.basic, 0, ProviderStatus.online),
    }
    assert read_serving(listed, registry) == {"basic": 1, "verified": 0}
    assert read_serving({}) == {"basic": 0, "verified": 0}
