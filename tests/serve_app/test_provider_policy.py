from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.registry import ProviderTerms
from core.schema import ProviderReview, ProviderStatus
from kernel.errors import DarkGpuError
from kernel.labels import TrustTier
from serve_app.errors import body
from serve_app.provider_policy import (
    DEMOTE_STRIKES,
    EXCLUDE_STRIKES,
    NoCandidate,
    NoProviderReason,
    Price,
    Ranked,
    ReplicaStats,
    Requirements,
    by_load,
    no_candidate_error,
    parse_requirements,
    provider_price,
    rank,
    tier_satisfies,
)

CATALOG = Price(15, 60)  # qwen3.5-7b: $0.015 / $0.06 per 1M tokens
B, V = TrustTier.basic, TrustTier.verified


def replica(rid: str, tier=B, pct=0, load=0.0, healthy=True, draining=False) -> ReplicaStats:
    return ReplicaStats(rid, f"prv_{rid}", tier, pct, healthy, draining, load)


def ranked_ids(result: Ranked | NoCandidate) -> list[str]:
    assert isinstance(result, Ranked), result
    return result.replica_ids


def test_provider_price_is_catalog_times_one_plus_floor_rounded_up() -> None:
    assert provider_price(CATALOG, 0) == CATALOG
    assert provider_price(CATALOG, 20) == Price(18, 72)
    assert provider_price(CATALOG, 5) == Price(16, 63)  # 15.75 → 16
    assert provider_price(Price(750_000, 1), 100) == Price(1_500_000, 2)
    with pytest.raises(ValueError):
        provider_price(CATALOG, -1)


def test_healthy_first_then_least_loaded_then_cheapest() -> None:
    replicas = [
        replica("sick", load=0.0, healthy=False),
        replica("busy", load=0.9),
        replica("dear", load=0.1, pct=0),
        replica("cheap", load=0.1, pct=0),
        replica("idle", load=0.0),
    ]
    # "cheap" and "dear" tie on load and price: replica id breaks the tie.
    assert ranked_ids(rank(replicas, Requirements(), CATALOG)) == [
        "idle",
        "cheap",
        "dear",
        "busy",
        "sick",
    ]


def test_at_equal_load_the_cheaper_provider_wins() -> None:
    allow = Requirements(max_price=Price(30, 120))
    replicas = [replica("a", pct=50, load=0.2), replica("b", pct=10, load=0.2)]
    result = rank(replicas, allow, CATALOG)
    assert ranked_ids(result) == ["b", "a"]
    assert isinstance(result, Ranked)
    assert result.candidates[0].price == Price(17, 66)
    assert result.highest == Price(23, 90)  # the reservation covers the dearest candidate


def test_draining_replicas_come_last_and_serve_only_while_nothing_else_fits() -> None:
    result = rank([replica("d", draining=True), replica("ok", load=5)], Requirements(), CATALOG)
    assert ranked_ids(result) == ["ok", "d"]
    # a drained node's replacement is not up yet: its replica still answers, nothing fails
    alone = rank([replica("d", draining=True)], Requirements(), CATALOG)
    assert ranked_ids(alone) == ["d"]
    # ... but not past the request's tier or price
    pricey = [replica("d", draining=True), replica("p", pct=50)]
    assert ranked_ids(rank(pricey, Requirements(), CATALOG)) == ["d"]


def test_no_provider_online() -> None:
    result = rank([], Requirements(trust_tier=V), CATALOG, "qwen3.5-7b")
    assert isinstance(result, NoCandidate)
    assert result.reason is NoProviderReason.no_provider_online
    assert "qwen3.5-7b" in result.message


def test_tier_requirement_filters_and_verified_serves_basic_requests() -> None:
    replicas = [replica("b1"), replica("v1", tier=V, load=3)]
    assert ranked_ids(rank(replicas, Requirements(trust_tier=V), CATALOG)) == ["v1"]
    assert ranked_ids(rank(replicas, Requirements(trust_tier=B), CATALOG)) == ["b1", "v1"]
    none = rank([replica("b1")], Requirements(trust_tier=V), CATALOG)
    assert isinstance(none, NoCandidate) and none.reason is NoProviderReason.none_at_tier
    assert "'verified'" in none.message
    assert tier_satisfies(V, B) and not tier_satisfies(B, V) and tier_satisfies(B, None)


def test_by_default_only_providers_at_or_below_the_catalog_price() -> None:
    replicas = [replica("floor0"), replica("floor20", pct=20)]
    assert ranked_ids(rank(replicas, Requirements(), CATALOG)) == ["floor0"]
    none = rank([replica("floor20", pct=20)], Requirements(), CATALOG)
    assert isinstance(none, NoCandidate) and none.reason is NoProviderReason.none_at_price
    assert "20% above" in none.message


def test_max_price_allows_dearer_providers_on_both_sides() -> None:
    replicas = [replica("floor20", pct=20)]
    enough = Requirements(max_price=Price(18, 72))
    assert ranked_ids(rank(replicas, enough, CATALOG)) == ["floor20"]
    output_short = Requirements(max_price=Price(18, 71))
    assert isinstance(rank(replicas, output_short, CATALOG), NoCandidate)


def test_tier_is_checked_before_price() -> None:
    result = rank([replica("b", pct=50)], Requirements(trust_tier=V), CATALOG)
    assert isinstance(result, NoCandidate) and result.reason is NoProviderReason.none_at_tier


def test_no_candidate_error_is_a_503_naming_the_reason() -> None:
    none = rank([], Requirements(), CATALOG, "m")
    assert isinstance(none, NoCandidate)
    error = no_candidate_error(none, retry_after_s=7)
    assert error.status == 503
    assert body(error)["error"]["type"] == "service_unavailable"
    assert body(error)["error"]["code"] == "no_provider_online"
    assert error.headers == {"Retry-After": "7"}


def test_replica_stats_from_routing_stats() -> None:
    assert ReplicaStats.from_routing_stats("r", {"ongoing": 1}) is None
    stats = {
        "provider_id": "prv_x",
        "trust_tier": "verified",
        "price_floor_pct": 15,
        "ongoing": 3,
        "draining": True,
    }
    got = ReplicaStats.from_routing_stats("r", stats, pool=V)  # in the verified pool
    assert got == ReplicaStats("r", "prv_x", V, 15, True, True, 3.0, pool=V)
    # in the basic pool it is basic, whatever it says
    assert ReplicaStats.from_routing_stats("r", stats).trust_tier is B
    assert ReplicaStats.from_routing_stats("r", stats, load=0.5).load == 0.5
    odd = ReplicaStats.from_routing_stats("r", {"provider_id": "p", "trust_tier": "gold"})
    assert odd is not None and odd.trust_tier is B


def test_the_registry_overrides_self_declared_labels() -> None:
    claims = {"provider_id": "prv_x", "trust_tier": "verified", "price_floor_pct": 0}
    registry = {"prv_x": ProviderTerms(B, 30, ProviderStatus.online)}
    got = ReplicaStats.from_routing_stats("r", claims, registry=registry)
    assert got is not None and (got.trust_tier, got.price_floor_pct, got.draining) == (B, 30, False)
    stranger = ReplicaStats.from_routing_stats(
        "r", {**claims, "provider_id": "prv_?", "price_floor_pct": 20}, registry=registry
    )
    assert stranger is not None and (stranger.trust_tier, stranger.price_floor_pct) == (B, 20)
    assert got.approved and not stranger.approved  # a made-up provider id serves nothing
    head = ReplicaStats.from_routing_stats("r", {"provider_id": "local"}, registry=registry)
    assert head is not None and head.approved and head.trust_tier is B  # the platform's own


@pytest.mark.parametrize("review", [ProviderReview.pending, ProviderReview.suspended,
                                    ProviderReview.revoked])  # fmt: skip
def test_a_provider_the_operator_has_not_approved_serves_nothing(review: ProviderReview) -> None:
    """Not even as a last resort (as a draining replica would), and whatever its replica
    claims: its node may still be in the cluster with a replica running."""
    registry = {"prv_x": ProviderTerms(V, 0, ProviderStatus.online, review),
                "prv_y": ProviderTerms(B, 0, ProviderStatus.online)}  # fmt: skip
    held = ReplicaStats.from_routing_stats("x", {"provider_id": "prv_x"}, registry=registry)
    good = ReplicaStats.from_routing_stats("y", {"provider_id": "prv_y"}, registry=registry)
    assert held is not None and good is not None
    assert not held.approved and good.approved
    assert ranked_ids(rank([held, good], Requirements(), CATALOG)) == ["y"]
    alone = rank([held], Requirements(), CATALOG)
    assert isinstance(alone, NoCandidate) and alone.reason is NoProviderReason.no_provider_online


@pytest.mark.parametrize(
    ("status", "draining"),
    [
        (ProviderStatus.online, False),
        (ProviderStatus.offline, False),  # a stale heartbeat alone: its node still answers
        (ProviderStatus.paused, True),
        (ProviderStatus.draining, True),
    ],
)
def test_a_provider_the_registry_says_is_leaving_takes_no_new_requests(
    status: ProviderStatus, draining: bool
) -> None:
    registry = {"prv_x": ProviderTerms(V, 0, status)}
    got = ReplicaStats.from_routing_stats("r", {"provider_id": "prv_x"}, registry=registry)
    assert got is not None and got.draining is draining
    said = ReplicaStats.from_routing_stats(
        "r", {"provider_id": "prv_x", "draining": True}, registry=registry
    )
    assert said is not None and said.draining  # the replica's own word counts


def test_parse_requirements() -> None:
    assert parse_requirements(None, CATALOG) == Requirements()
    assert parse_requirements(None, CATALOG, default_tier=V) == Requirements(trust_tier=V)
    assert parse_requirements({"trust_tier": "basic"}, CATALOG, V).trust_tier is B
    req = parse_requirements({"max_price": {"prompt": 0.018, "completion": "0.072"}}, CATALOG)
    assert req.max_price == Price(18, 72)
    one_side = parse_requirements({"max_price": {"completion": 1}}, CATALOG)
    assert one_side.max_price == Price(15, 1000)  # the prompt side stays at the catalog price
    assert parse_requirements({"sort": "price", "only": ["x"]}, CATALOG) == Requirements()


@pytest.mark.parametrize(
    ("provider", "param"),
    [
        ("verified", "provider"),
        ({"trust_tier": "gold"}, "provider.trust_tier"),
        ({"max_price": 3}, "provider.max_price"),
        ({"max_price": {"prompt": -1}}, "provider.max_price.prompt"),
        ({"max_price": {"completion": "lots"}}, "provider.max_price.completion"),
        ({"max_price": {"prompt": True}}, "provider.max_price.prompt"),
    ],
)
def test_parse_requirements_refuses_bad_input(provider: object, param: str) -> None:
    with pytest.raises(DarkGpuError) as info:
        parse_requirements(provider, CATALOG)
    assert info.value.status == 400 and info.value.param == param


@pytest.mark.parametrize(
    "bad",
    [
        {"provider_id": {"$ne": 1}},
        {"provider_id": ""},
        {"provider_id": "p" * 65},
        {"provider_id": "prv_x", "price_floor_pct": "cheap"},
        {"provider_id": "prv_x", "price_floor_pct": 10**30},
        {"provider_id": "prv_x", "price_floor_pct": -5},
        {"provider_id": "prv_x", "ongoing": "lots"},
        {"provider_id": "prv_x", "ongoing": float("nan")},
        {"provider_id": "prv_x", "ongoing": -1},
        {"provider_id": "prv_x", "ongoing": True},
    ],
)
def test_a_malformed_stats_entry_costs_only_its_replica(bad: dict) -> None:
    """Issue 11: one malformed entry broke routing for its whole model. Stats come from a
    replica on the provider's machine: a bad one is ignored (logged), the others route."""
    assert ReplicaStats.from_routing_stats("bad", bad) is None
    good = ReplicaStats.from_routing_stats("good", {"provider_id": "prv_y", "ongoing": 2})
    assert good is not None and good.load == 2.0
    odd = ReplicaStats.from_routing_stats(
        "odd", {"provider_id": "prv_z", "trust_tier": ["verified"], "healthy": "yes",
                "draining": "no"})  # fmt: skip
    assert odd is not None and odd.trust_tier is B and not odd.healthy and odd.draining


def test_a_provider_with_recent_strikes_ranks_last_and_past_a_threshold_not_at_all() -> None:
    """Strikes come from the registry (its engine reported more than the ingress delivered):
    one demotes its replicas behind every other, however idle; `EXCLUDE_STRIKES` removes
    them."""
    approved = ProviderTerms(B, 0, ProviderStatus.online)

    def replicas(strikes: int) -> list[ReplicaStats]:
        registry = {"cheat": replace(approved, recent_strikes=strikes), "fair": approved}
        out = [
            ReplicaStats.from_routing_stats(
                f"r-{provider}",
                {"provider_id": provider, "trust_tier": "basic", "ongoing": ongoing},
                registry=registry,
            )
            for provider, ongoing in (("cheat", 0), ("fair", 9))
        ]
        return [r for r in out if r is not None]

    assert ranked_ids(rank(replicas(0), Requirements(), CATALOG)) == ["r-cheat", "r-fair"]
    demoted = replicas(DEMOTE_STRIKES)
    assert ranked_ids(rank(demoted, Requirements(), CATALOG)) == ["r-fair", "r-cheat"]
    assert demoted[0].demoted and not demoted[1].demoted
    excluded = replicas(EXCLUDE_STRIKES)
    assert ranked_ids(rank(excluded, Requirements(), CATALOG)) == ["r-fair"]
    alone = rank(excluded[:1], Requirements(), CATALOG)
    assert isinstance(alone, NoCandidate) and alone.reason.value == "no_provider_online"


def test_a_request_goes_to_its_best_candidates_pool_with_that_pools_candidates_only() -> None:
    """Each pool's router reaches its own replicas only: the ingress sends a request to the
    pool of the best candidate, listing the candidates there (in their order); the
    reservation still covers the dearest candidate of every pool."""
    replicas = [
        replace(replica("b1", load=0.5), pool=B),
        replace(replica("v1", V, pct=50, load=0.1), pool=V),
        replace(replica("b2", load=0.2), pool=B),
    ]
    ranked = rank(replicas, Requirements(max_price=Price(100, 100)), CATALOG)
    assert isinstance(ranked, Ranked) and ranked.replica_ids == ["v1", "b2", "b1"]
    assert (ranked.pool, ranked.in_pool().replica_ids) == (V, ["v1"])
    assert ranked.highest == provider_price(CATALOG, 50)
    busy = rank([replace(replicas[1], load=0.9), *replicas[::2]], Requirements(), CATALOG)
    assert isinstance(busy, Ranked) and busy.pool is B  # v1 asks more than the catalog price
    assert busy.in_pool().replica_ids == ["b2", "b1"]


def test_candidates_ranked_again_by_what_is_in_flight_now() -> None:
    """Requests ranked at once all find the same best candidate; at dispatch the ingress
    ranks them again by what it has in flight (from the moment each is sent), so a burst
    spreads over the pools instead of queueing in the first."""
    replicas = [replace(replica("b1"), pool=B), replace(replica("v1", V, pct=50), pool=V)]
    ranked = rank(replicas, Requirements(max_price=Price(100, 100)), CATALOG)
    assert isinstance(ranked, Ranked) and ranked.pool is B  # cheaper, at equal load
    in_flight = {"b1": 2}
    again = by_load(ranked, lambda rid: in_flight.get(rid, 0))
    assert (again.pool, again.replica_ids) == (V, ["v1", "b1"])
    assert by_load(ranked, lambda rid: 0).replica_ids == ["b1", "v1"]
