from dataclasses import dataclass, field

from cluster.labels import TrustTier
from serve_app.provider_policy import Price
from serve_app.router import Allowed, accepts, allowed, rank, restrict


@dataclass
class Replica:
    name: str
    load: float
    routing_stats: dict = field(default_factory=dict)


def stats(provider="p", tier="basic"):
    return {"provider_id": provider, "trust_tier": tier, "ongoing": 0}


def names(ranks):
    return [[r.name for r in tier] for tier in ranks]


def test_least_loaded_first():
    replicas = [
        Replica("busy", 0.9, stats()),
        Replica("idle", 0.0, stats()),
        Replica("half", 0.5, stats()),
    ]
    assert names(rank(replicas, lambda r: r.load)) == [["idle", "half", "busy"]]


def test_replicas_that_have_not_reported_come_last():
    replicas = [Replica("new", 0.0), Replica("known", 0.8, stats())]
    assert names(rank(replicas, lambda r: r.load)) == [["known"], ["new"]]


def test_trust_tier_filters():
    replicas = [Replica("b", 0.0, stats(tier="basic")), Replica("v", 0.5, stats(tier="verified"))]
    assert names(rank(replicas, lambda r: r.load, required_tier="verified")) == [["v"]]
    assert not accepts(stats(tier="basic"), "verified")
    assert accepts(stats(tier="basic"))
    assert rank([], lambda r: 0) == []


@dataclass
class Pending:
    args: list
    kwargs: dict = field(default_factory=dict)


@dataclass
class Info:
    headers: dict


CATALOG = Price(15, 60)


def priced(provider, tier="basic", floor=0, **extra):
    return {**stats(provider, tier), "price_floor_pct": floor, **extra}


def test_requests_without_the_ingress_headers_are_unrestricted():
    assert allowed(None) is None
    assert allowed(Pending(["request"])) is None
    assert allowed(Pending(["request", Info({"x-request-id": "r"})])) is None


def test_the_allowed_set_travels_in_the_headers():
    allow = Allowed(("r2", "r1"), TrustTier.verified, CATALOG, Price(23, 90))
    info = Info(allow.headers())
    assert allowed(Pending(["request", info])) == allow
    assert allowed(Pending(["request"], {"raw_request_info": info})) == allow
    anyone = Allowed(("r1",), None, CATALOG, CATALOG)
    assert allowed(Pending(["request", Info(anyone.headers())])) == anyone


def test_the_router_applies_the_policy_to_live_replicas():
    allow = Allowed(("r2", "r1"), TrustTier.verified, CATALOG, Price(23, 90))
    replicas = [
        Replica("r1", 0.0, priced("p1", "verified")),
        Replica("r2", 0.0, priced("p2", "verified", 50)),
        Replica("r3", 0.0, priced("p3", "basic")),  # below the tier
        Replica("r4", 0.0, priced("p4", "verified", 60)),  # above the reserved price
        Replica("r5", 0.0, priced("p5", "verified")),  # started since the ingress looked
        Replica("r6", 0.0, priced("p6", "verified", draining=True)),
        Replica("r7", 0.0),  # no stats here yet, not listed
        Replica("r2b", 0.0),
    ]
    kept = restrict(replicas, allow, id_of=lambda r: r.name)
    assert [r.name for r in kept] == ["r2", "r1", "r5"]
    listed = Allowed(("r7",), None, CATALOG, CATALOG)  # listed by the ingress: kept
    assert [r.name for r in restrict(replicas, listed, id_of=lambda r: r.name)] == [
        "r7", "r1", "r3", "r5"
    ]  # fmt: skip
