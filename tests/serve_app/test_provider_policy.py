from __future__ import annotations

import pytest

from billing.schema import ProviderStatus
from cluster.labels import TrustTier
from cluster.registry import ProviderTerms
from serve_app.errors import APIError
from serve_app.provider_policy import (
    NoCandidate,
    NoProviderReason,
    Price,
    Ranked,
    ReplicaStats,
    Requirements,
    fitting_providers,
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
    assert error.body()["error"]["type"] == "service_unavailable"
    assert error.body()["error"]["code"] == "no_provider_online"
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
    got = ReplicaStats.from_routing_stats("r", stats)
    assert got == ReplicaStats("r", "prv_x", V, 15, True, True, 3.0)
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
    with pytest.raises(APIError) as info:
        parse_requirements(provider, CATALOG)
    assert info.value.status == 400 and info.value.param == param


def test_fitting_providers_come_from_the_registry_whether_or_not_they_have_replicas() -> None:
    registry = {
        "basic": ProviderTerms(B, 0, ProviderStatus.online),
        "dear": ProviderTerms(B, 50, ProviderStatus.online),
        "verified": ProviderTerms(V, 0, ProviderStatus.offline),
        "leaving": ProviderTerms(V, 0, ProviderStatus.draining),
    }
    assert fitting_providers(registry, Requirements(), CATALOG) == {"basic", "verified"}
    assert fitting_providers(registry, Requirements(trust_tier=V), CATALOG) == {"verified"}
    allow_more = Requirements(max_price=Price(100, 100))
    assert fitting_providers(registry, allow_more, CATALOG) == {"basic", "dear", "verified"}
