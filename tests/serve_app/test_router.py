from dataclasses import dataclass, field

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


def test_draining_replicas_come_after_every_other():
    replicas = [
        Replica("leaving", 0.0, {**stats(), "draining": True}),
        Replica("new", 0.5),
        Replica("known", 0.8, stats()),
    ]
    assert names(rank(replicas, lambda r: r.load)) == [["known"], ["new"], ["leaving"]]
    assert not accepts({**stats(), "draining": True})
    assert accepts(stats())
    assert rank([], lambda r: 0) == []


@dataclass
class Pending:
    args: list
    kwargs: dict = field(default_factory=dict)


@dataclass
class Info:
    headers: dict


def test_requests_without_the_ingress_headers_are_unrestricted():
    assert allowed(None) is None
    assert allowed(Pending(["request"])) is None
    assert allowed(Pending(["request", Info({"x-request-id": "r"})])) is None


def test_the_allowed_set_travels_in_the_headers():
    allow = Allowed(("r2", "r1"), frozenset({"p2", "p1"}))
    info = Info(allow.headers())
    assert allowed(Pending(["request", info])) == allow
    assert allowed(Pending(["request"], {"raw_request_info": info})) == allow


def test_the_router_keeps_the_ingress_pick_and_new_replicas_of_its_providers():
    """Tiers and prices were decided by the ingress from the registry: a replica's own
    claim (its labels) does not get it in."""
    allow = Allowed(("r2", "r1"), frozenset({"p1", "p2"}))
    replicas = [
        Replica("r1", 0.0, stats("p1")),
        Replica("r2", 0.0, stats("p2")),
        Replica("r3", 0.0, stats("p3", "verified")),  # claims verified: not a chosen provider
        Replica("r5", 0.0, stats("p1")),  # started since the ingress looked, on p1
        Replica("r6", 0.0, {**stats("p4"), "draining": True}),  # not a chosen provider
        Replica("r7", 0.0),  # no stats here yet, not listed
        Replica("r2b", 0.0),
    ]
    kept = restrict(replicas, allow, id_of=lambda r: r.name)
    assert [r.name for r in kept] == ["r2", "r1", "r5"]
    listed = Allowed(("r7",), frozenset())  # listed by the ingress: kept
    assert [r.name for r in restrict(replicas, listed, id_of=lambda r: r.name)] == ["r7"]
