"""The ingress's replica directory: the pool's list of replicas, as the ingress keeps it
(with the registry's terms, and only where a node is bound to the provider a replica names:
real SQL for the bindings)."""

from __future__ import annotations

import redis
from sqlalchemy import Engine

from billing.plans import Plans
from cluster import nodes
from cluster.registry import ProviderTerms
from core.schema import ProviderStatus
from kernel.labels import LOCAL_PROVIDER_ID, TrustTier
from serve_app.node_bindings import NodeBindings
from serve_app.pool_protocol import PoolListing, PoolReplica
from serve_app.replica_stats import ReplicaDirectory, by_model
from tests.billing import conftest as billing
from tests.cluster.test_nodes import labelled, provider

db_url, engine, r, plans = billing.db_url, billing.engine, billing.r, billing.plans
NODE_A, NODE_B, HEAD = "a" * 56, "b" * 56, "c" * 56


def stats(provider: str, tier: str = "basic", floor: int = 0, ongoing: int = 0) -> dict:
    return {"provider_id": provider, "trust_tier": tier, "price_floor_pct": floor,
            "ongoing": ongoing}  # fmt: skip


def listing(replica: str, node: str, said: dict, model: str = "m") -> PoolReplica:
    return PoolReplica(model, replica, node, said)


def test_replicas_by_model_with_the_registrys_terms() -> None:
    listed = [
        listing("r1", NODE_A, stats("p1")),
        listing("r2", NODE_B, stats("p2", "verified", 20, ongoing=3)),
        listing("r3", NODE_B, {"ongoing": 0}),  # names no provider: not a candidate
        listing("r4", NODE_A, stats("p1"), model="other"),
    ]
    found = by_model(listed, pool=TrustTier.verified)
    assert {m: [r.replica_id for r in rs] for m, rs in found.items()} == {
        "m": ["r1", "r2"], "other": ["r4"]
    }  # fmt: skip
    r2 = found["m"][1]
    assert (r2.provider_id, r2.trust_tier, r2.price_floor_pct, r2.load) == (
        "p2", TrustTier.verified, 20, 3.0
    )  # fmt: skip
    registry = {"p2": ProviderTerms(TrustTier.basic, 0, ProviderStatus.online)}
    r2 = by_model(listed, registry)["m"][1]  # the registry's word, not the node's labels
    assert (r2.trust_tier, r2.price_floor_pct) == (TrustTier.basic, 0)


def test_a_replica_is_never_above_its_pools_tier_nor_serves_from_another_tiers_pool() -> None:
    """Every node of a pool can run code on every other: a replica in the basic pool is basic,
    whatever its labels or its provider's tier say; a provider the registry has in another
    tier than its pool's (its tier changed since it joined) serves from there no request."""
    verified = {"p2": ProviderTerms(TrustTier.verified, 0, ProviderStatus.online)}
    basic = {"p2": ProviderTerms(TrustTier.basic, 0, ProviderStatus.online)}
    said = [listing("r2", NODE_B, stats("p2", "verified"))]
    [labelled] = by_model(said)["m"]  # no registry: its labels, capped at the pool's tier
    assert (labelled.trust_tier, labelled.pool) == (TrustTier.basic, TrustTier.basic)
    [there] = by_model(said, verified, pool=TrustTier.verified)["m"]
    assert (there.trust_tier, there.pool, there.approved) == (TrustTier.verified,) * 2 + (True,)
    [in_basic] = by_model(said, verified)["m"]
    assert (in_basic.trust_tier, in_basic.approved) == (TrustTier.basic, False)
    [demoted] = by_model(said, basic, pool=TrustTier.verified)["m"]
    assert (demoted.trust_tier, demoted.approved) == (TrustTier.basic, False)


async def test_a_replica_serves_only_where_its_node_is_bound_to_the_provider_it_names(
    engine: Engine, r: redis.Redis, plans: Plans
) -> None:
    """Where the pool placed a replica is the pool's GCS's word, as its gateway lists it; the
    binding of that node is the control plane's (SQL). A replica on a node bound to another
    provider, on no bound node, or naming `local` away from a control node is left out."""
    alice = provider(engine, r, plans, "a@example.com")
    bob = provider(engine, r, plans, "b@example.com")
    for who, node in ((alice, NODE_A), (bob, NODE_B)):
        nodes.redeem(engine, who, nodes.issue_ticket(engine, who).ticket, labelled(node, who))
    listed = [
        listing("alice-on-a", NODE_A, stats(alice)),
        listing("alice-on-b", NODE_B, stats(alice)),  # on bob's node, saying alice
        listing("alice-elsewhere", "d" * 56, stats(alice)),  # an unbound node
        listing("head", HEAD, stats(LOCAL_PROVIDER_ID)),
        listing("local-on-a", NODE_A, stats(LOCAL_PROVIDER_ID)),
    ]

    async def read() -> PoolListing:
        return PoolListing(listed)

    directory = ReplicaDirectory(
        {TrustTier.basic: read}, bindings=NodeBindings(engine, frozenset({HEAD}))
    )
    assert [x.replica_id for x in await directory.replicas("m")] == ["alice-on-a", "head"]


async def test_a_pool_that_cannot_be_read_keeps_the_last_reading() -> None:
    answers: list[PoolListing | Exception] = [
        PoolListing([listing("r1", NODE_A, stats("p1")), listing("r2", NODE_B, stats("p2"))]),
        ConnectionError("the pool is down"),
        PoolListing([listing("r2", NODE_B, stats("p2"))]),  # r1 went away
    ]

    async def read() -> PoolListing:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    directory = ReplicaDirectory({TrustTier.basic: read}, ttl_s=0)
    assert [x.replica_id for x in await directory.replicas("m")] == ["r1", "r2"]
    assert [x.replica_id for x in await directory.refresh("m")] == ["r1", "r2"]  # kept
    assert [x.replica_id for x in await directory.refresh("m")] == ["r2"]
    assert await directory.replicas("other") == []


async def test_an_unreadable_pool_at_start_leaves_the_directory_empty_not_failing() -> None:
    async def read() -> PoolListing:
        raise ConnectionError("nobody listening")

    directory = ReplicaDirectory({TrustTier.basic: read})
    assert await directory.replicas("m") == []
    assert await directory.online() == frozenset()


async def test_models_come_online_as_the_pool_says_and_each_is_told_once() -> None:
    """A model is online from the reading that lists it (the pool's Serve controller's word);
    the ingress measures its load time from it (`on_online`). A reading that fails keeps
    what was online."""
    answers: list[PoolListing | Exception] = [
        PoolListing([], frozenset()),
        PoolListing([], frozenset({"m"})),
        ConnectionError("the pool is down"),
        PoolListing([], frozenset({"m", "n"})),
        PoolListing([], frozenset({"n"})),
    ]
    told: list[str] = []

    async def read() -> PoolListing:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    directory = ReplicaDirectory({TrustTier.basic: read}, ttl_s=0, on_online=told.append)
    seen = []
    for _ in range(5):
        await directory.refresh("m")
        seen.append(await directory.is_online("m"))
    assert seen == [False, True, True, True, False]
    assert told == ["m", "n"]


async def test_every_pools_replicas_are_read_and_tagged_with_their_pool() -> None:
    """Each pool is read on its own: its replicas carry its tier as their pool; a model is
    online where any pool says so; a pool that fails keeps its last reading while the
    other's is fresh."""
    verified_answers: list[PoolListing | Exception] = [
        PoolListing([listing("v1", NODE_B, stats("p2", "verified"))], frozenset({"m"})),
        ConnectionError("the verified pool is down"),
    ]
    basic_answers = [
        PoolListing([listing("b1", NODE_A, stats("p1"))], frozenset()),
        PoolListing([listing("b2", NODE_A, stats("p1"))], frozenset({"n"})),
    ]

    async def basic() -> PoolListing:
        return basic_answers.pop(0)

    async def verified() -> PoolListing:
        answer = verified_answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    directory = ReplicaDirectory({TrustTier.basic: basic, TrustTier.verified: verified}, ttl_s=0)
    first = await directory.replicas("m")
    assert [(x.replica_id, x.pool, x.trust_tier) for x in first] == [
        ("b1", TrustTier.basic, TrustTier.basic), ("v1", TrustTier.verified, TrustTier.verified)
    ]  # fmt: skip
    assert await directory.online() == frozenset({"m"})
    again = await directory.refresh("m")
    assert [x.replica_id for x in again] == ["b2", "v1"]  # the verified pool's last reading
    assert await directory.online() == frozenset({"m", "n"})
