import asyncio
from dataclasses import dataclass, field

from ray.serve.request_router import ReplicaID

from serve_app.router import (
    Allowed,
    InFlight,
    ProviderRequestRouter,
    allowed,
    load,
    reported_load,
    restrict,
)


@dataclass
class Replica:
    name: str
    load: float
    routing_stats: dict = field(default_factory=dict)


def stats(provider="p", tier="basic"):
    return {"provider_id": provider, "trust_tier": tier, "ongoing": 0}


def names(ranks):
    return [[r.name for r in tier] for tier in ranks]


@dataclass
class Pending:
    args: list
    kwargs: dict = field(default_factory=dict)


@dataclass
class Info:
    headers: dict


def test_requests_without_the_ingress_headers_list_nothing():
    assert allowed(None) is None
    assert allowed(Pending(["request"])) is None
    assert allowed(Pending(["request", Info({"x-request-id": "r"})])) is None


def test_the_allowed_set_travels_in_the_headers():
    allow = Allowed(("r2", "r1"), frozenset({"p1"}))
    info = Info(allow.headers())
    assert allowed(Pending(["request", info])) == allow
    assert allowed(Pending(["request"], {"raw_request_info": info})) == allow


def test_the_router_keeps_only_the_ingress_pick():
    """Tiers, prices and node bindings were decided by the ingress, in the control plane: a
    replica's own claim (its stats, its node's labels) does not get it in, not even as a
    new replica of a provider the ingress listed (the pool holds no bindings to vouch for
    it): it takes requests once the ingress has read it."""
    allow = Allowed(("r2", "r1"))
    replicas = [
        Replica("r1", 0.0, stats("p1")),
        Replica("r2", 0.0, stats("p2")),
        Replica("r3", 0.0, stats("p3", "verified")),  # claims verified: not a chosen provider
        Replica("r5", 0.0, stats("p1")),  # says p1, unread by the ingress: not yet
        Replica("r6", 0.0, {**stats("p4"), "draining": True}),  # not a chosen provider
        Replica("r7", 0.0),  # no stats here yet, not listed
        Replica("r2b", 0.0),
    ]
    kept = restrict(replicas, allow, id_of=lambda r: r.name)
    assert [r.name for r in kept] == ["r2", "r1"]
    listed = Allowed(("r7",))  # listed by the ingress: kept
    assert [r.name for r in restrict(replicas, listed, id_of=lambda r: r.name)] == ["r7"]


async def test_a_load_that_is_not_a_count_draws_no_traffic():
    """A replica's stats come from its provider's machine: a malformed `ongoing` must not
    raise in the router (it broke routing for the model) nor make the replica look idle."""
    assert reported_load({"ongoing": 3}) == 3.0
    for bad in ("0", None, True, float("nan"), -1, [0]):
        assert reported_load({"ongoing": bad}) == float("inf")
    deployment = DeploymentID(name="llm", app_name="darkgpu")
    liar = Running(ReplicaID("liar", deployment), {**stats(), "ongoing": "0"})
    ok = Running(ReplicaID("ok", deployment), stats())
    chosen = await serve_router().choose_replicas([liar, ok], listing([liar, ok]))
    assert [[r.replica_id.unique_id for r in rank] for rank in chosen] == [["ok"], ["liar"]]


# --- load the router counts itself ------------------------------------------------------------


@dataclass
class Running:
    """What Ray Serve's router reads of a running replica."""

    replica_id: ReplicaID
    routing_stats: dict
    max_ongoing_requests: int = 100


@dataclass(frozen=True)
class DeploymentID:  # what the router reads of Serve's (internal) deployment id
    name: str
    app_name: str


@dataclass(frozen=True)
class HandleSource:  # a deployment handle's source (Serve's enum is internal): not the proxy
    value: str = "UNKNOWN"


def serve_router() -> ProviderRequestRouter:
    """The request router as Serve builds it for a handle (queue length cache on)."""
    return ProviderRequestRouter(
        deployment_id=DeploymentID(name="llm", app_name="darkgpu"),
        handle_source=HandleSource(),
        use_replica_queue_len_cache=True,
    )


def listing(replicas: list[Running]) -> Pending:
    """A request as the ingress sends it, listing `replicas` (in that order)."""
    allow = Allowed(tuple(r.replica_id.unique_id for r in replicas))
    pending = Pending(["request", Info(allow.headers())])
    pending.future = asyncio.get_running_loop().create_future()  # type: ignore[attr-defined]
    return pending


async def route(router: ProviderRequestRouter, replicas: list[Running]) -> Running:
    """One request as Serve routes it: the router's ranks, best first, and within a rank the
    replica Serve's own selection takes (the real `_select_from_candidate_replicas`, by its
    queue length cache); then it is sent."""
    for group in await router.choose_replicas(replicas, listing(replicas)):
        chosen = await router._select_from_candidate_replicas(group, 0)
        if chosen is not None:
            router.on_send_request(chosen.replica_id)
            return chosen
    raise AssertionError("no replica chosen")


async def test_a_replica_reporting_no_load_gets_no_more_than_its_share():
    """A replica runs on its provider's machine: it reports `ongoing: 0` in its routing stats
    and answers Serve's queue-length protocol with 0 (a patched replica controls both). The
    router weighs the requests it has in flight there itself, so the liar gets its share of
    twenty requests, not all of them."""
    deployment = DeploymentID(name="llm", app_name="darkgpu")
    liar = Running(ReplicaID("liar", deployment), stats("p1"))
    honest = Running(ReplicaID("honest", deployment), stats("p2"))
    replicas = [liar, honest]
    router = serve_router()
    router._replicas = {r.replica_id: r for r in replicas}
    served: dict[str, int] = {"liar": 0, "honest": 0}
    for _ in range(20):
        for r in replicas:  # each answers Serve's probe with the load it claims
            claimed = 0 if r is liar else served["honest"]
            router.on_new_queue_len_info(r.replica_id, claimed)
        honest.routing_stats["ongoing"] = served["honest"]
        chosen = await route(router, replicas)
        served[chosen.replica_id.unique_id] += 1
    assert served == {"liar": 10, "honest": 10}
    # requests that complete free their replica's share again
    for _ in range(10):
        router.on_request_completed(liar.replica_id, "request")
    assert router.in_flight[liar.replica_id] == 0
    assert router.in_flight[honest.replica_id] == 10


def test_load_is_the_most_of_the_routers_count_the_cache_and_the_report():
    counts = InFlight()
    counts.sent("r")
    counts.sent("r")
    counts.completed("r")
    assert counts["r"] == 1 and counts["other"] == 0
    counts.completed("r")
    counts.completed("r")  # a completion Serve reports for a request never sent: no debt
    assert counts["r"] == 0
    assert load(3, 0, {"ongoing": 0}) == 3.0
    assert load(0, 5, {"ongoing": 0}) == 5.0
    assert load(0, None, {"ongoing": 7}) == 7.0  # a replica may say it is busier
    assert load(0, None, {"ongoing": "0"}) == float("inf")


def test_providers_with_recent_strikes_come_after_every_other():
    allow = Allowed(("r1", "r2", "r3"), frozenset({"p1"}))
    assert allowed(Pending(["request", Info(allow.headers())])) == allow
    deployment = DeploymentID(name="llm", app_name="darkgpu")
    struck = Running(ReplicaID("r1", deployment), stats("p1"))
    fine = Running(ReplicaID("r2", deployment), {**stats("p2"), "ongoing": 50})
    leaving = Running(ReplicaID("r3", deployment), {**stats("p2"), "draining": True})

    async def ranks() -> list[list[str]]:
        router = serve_router()
        pending = Pending(["request", Info(allow.headers())])
        pending.future = asyncio.get_running_loop().create_future()  # type: ignore[attr-defined]
        chosen = await router.choose_replicas([struck, fine, leaving], pending)  # type: ignore[arg-type]
        return [[r.replica_id.unique_id for r in group] for group in chosen]

    # the struck provider's idle replica only after the busy one without strikes
    assert asyncio.run(ranks()) == [["r2"], ["r1"], ["r3"]]


async def test_with_no_replica_that_may_serve_the_router_yields_before_answering_none():
    """Serve asks again as soon as the router answers no replica: answering at once would
    spin the router's thread (shared by every model's router in the gateway's process) and
    starve the rest of it, as seen when a model's first replica came up before its stats.
    A request that lists nothing (no ingress sent it) is taken by none."""
    deployment = DeploymentID(name="llm", app_name="model-x")
    replica = Running(ReplicaID("new", deployment), {})  # no stats yet
    router = serve_router()
    yielded = asyncio.Event()

    async def other_work() -> None:
        yielded.set()

    unlisted = Pending(["request"])
    elsewhere = Pending(["request", Info(Allowed(("not-running-here",)).headers())])
    elsewhere.future = asyncio.get_running_loop().create_future()  # type: ignore[attr-defined]
    for request in (None, unlisted, elsewhere):
        yielded.clear()
        other = asyncio.ensure_future(other_work())
        assert await router.choose_replicas([replica], request) == []
        assert yielded.is_set()
        await other
