from dataclasses import dataclass, field

from serve_app.router import accepts, rank


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
