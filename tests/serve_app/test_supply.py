"""The supply reconciler (`serve_app.supply.SupplyReconciler`) against real SQL and Redis, the
cluster's node table recorded and Serve's deploy and delete calls recorded (the real ones run
in the multi-node suite); and the ingress's view of its plan (`serve_app.supply_view`)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from redis import asyncio as aredis
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from billing.plans import Plans
from cluster import nodes, registry
from cluster.catalog import Catalog, CatalogModel, load_catalog
from cluster.supply import ModelSupply
from core.schema import Provider, ProviderReview
from core.settings import CONFIGS_DIR, Settings
from kernel import redis_keys
from kernel.labels import PROVIDER_ID_LABEL, VRAM_RESOURCE, TrustTier, model_resources
from serve_app.models import deployment_version, llm_config_for
from serve_app.pool_models import ModelApplier
from serve_app.supply import Plan, PoolSupply, SupplyReconciler
from serve_app.supply_view import SupplyView
from tests.billing import conftest as billing
from tests.cluster.test_nodes import provider

r, plans, sqlite_engine = billing.r, billing.plans, billing.sqlite_engine

TINY = load_catalog(CONFIGS_DIR / "models.toml").get("darkgpu-tiny")
CATALOG = Catalog(
    models=[
        TINY.model_copy(update={"min_vram_gb": 16}),
        TINY.model_copy(update={"id": "darkgpu-tiny-b", "min_vram_gb": 16}),
    ]
)
HEAD, NODE_A, NODE_B, ROGUE = "h" * 56, "a" * 56, "b" * 56, "c" * 56
A_24GB = {"CPU": 4.0, VRAM_RESOURCE: 24.0}


def alive(node_id: str, resources: dict[str, float]) -> nodes.ClusterNode:
    return nodes.ClusterNode(node_id, True, {}, resources)


class Recorded:
    """The cluster and Serve as the reconciler sees them: the alive nodes, the draining ones,
    and the deploys and deletes it asked for."""

    def __init__(self) -> None:
        # the basic pool's head: every catalog model (a head that declares none holds none)
        self.alive = [alive(HEAD, {"CPU": 8.0, **model_resources(m.id for m in CATALOG.models)})]
        self.draining: set[str] = set()
        self.running = {"model-darkgpu-tiny-b"}  # left by an earlier reconciler
        self.calls: list[tuple[str, str, ModelSupply | None]] = []

    def nodes(self) -> list[nodes.ClusterNode]:
        """The pool's node table as its gateway lists it."""
        return [replace(n, draining=n.node_id in self.draining) for n in self.alive]

    def applier(self, settings: Settings) -> ModelApplier:
        """The pool's side of the plan (`PUT <pool>/models`), over the recorded Serve."""
        return ModelApplier(CATALOG, settings, deploy=self.deploy, delete=self.delete,
                            running_apps=lambda: self.running)  # fmt: skip

    def pool(self, settings: Settings) -> PoolSupply:
        """The pool as the reconciler drives it: its node table and its deploy."""
        applier = self.applier(settings)

        class Pool:
            nodes = self.nodes

            @staticmethod
            def apply_models(wanted: Mapping[str, ModelSupply]) -> None:
                applier.apply(wanted)

        return Pool()

    def deploy(self, model: CatalogModel, supply: ModelSupply, settings: Settings) -> None:
        self.calls.append(("deploy", model.id, supply))

    def delete(self, app_name: str) -> None:
        self.calls.append(("delete", app_name, None))

    def taken(self) -> list[tuple[str, str, ModelSupply | None]]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def cluster() -> Recorded:
    return Recorded()


@pytest.fixture
def reconciler(
    sqlite_engine: Engine, r: redis.Redis, cluster: Recorded, tmp_path: Path
) -> Iterator[SupplyReconciler]:
    settings = Settings(data_dir=tmp_path, min_replicas=1, max_replicas=4,
                        scale_to_zero_after_s=600)  # fmt: skip
    yield SupplyReconciler(
        CATALOG, settings, sqlite_engine, r, {HEAD},
        pools={TrustTier.basic: cluster.pool(settings)},
    )  # fmt: skip


def bind(engine: Engine, provider_id: str, node_id: str, models: list[str]) -> None:
    ticket = nodes.issue_ticket(engine, provider_id).ticket
    seen = nodes.ClusterNode(node_id, True, {PROVIDER_ID_LABEL: provider_id})
    nodes.redeem(engine, provider_id, ticket, seen, models=models)


def published(r: redis.Redis) -> Plan:
    return Plan.from_json(r.get(redis_keys.SUPPLY_PLAN))


def test_the_head_alone_deploys_nothing_and_removes_what_was_left(
    reconciler: SupplyReconciler, cluster: Recorded, r: redis.Redis
) -> None:
    assert reconciler.tick() == Plan({}, local=True)
    assert cluster.taken() == [("delete", "model-darkgpu-tiny-b", None)]
    assert published(r) == Plan({}, local=True)
    assert 0 < r.ttl(redis_keys.SUPPLY_PLAN) <= 60


def test_a_provider_serves_what_it_allows_cold_until_asked_and_leaves_with_its_node(
    reconciler: SupplyReconciler,
    cluster: Recorded,
    sqlite_engine: Engine,
    r: redis.Redis,
    plans: Plans,
) -> None:
    alice = provider(sqlite_engine, r, plans, "alice@example.com")
    bind(sqlite_engine, alice, NODE_A, ["darkgpu-tiny"])
    cluster.alive.append(alive(NODE_A, A_24GB))
    reconciler.tick()
    # cold: deployed with no replica; tiny-b, which nobody allows, removed and never deployed
    assert cluster.taken() == [("delete", "model-darkgpu-tiny-b", None),
                               ("deploy", "darkgpu-tiny", ModelSupply(0, 1))]  # fmt: skip
    reconciler.tick()
    assert cluster.taken() == []  # nothing changed: nothing deployed again

    r.hset(redis_keys.SUPPLY_ASKED, "darkgpu-tiny", time.time())  # an ingress had a request
    plan = reconciler.tick()
    assert plan is not None and plan.models == {"darkgpu-tiny": ModelSupply(1, 1)}
    assert cluster.taken() == [("deploy", "darkgpu-tiny", ModelSupply(1, 1))]

    cluster.draining.add(NODE_A)  # its window ended: kept (its replica moves first)
    reconciler.tick()
    assert cluster.taken() == []
    cluster.alive.remove(alive(NODE_A, A_24GB))  # gone
    reconciler.tick()
    assert cluster.taken() == [("delete", "model-darkgpu-tiny", None)]
    assert published(r).models == {}


def test_only_nodes_bound_to_an_approved_provider_count(
    reconciler: SupplyReconciler,
    cluster: Recorded,
    sqlite_engine: Engine,
    r: redis.Redis,
    plans: Plans,
) -> None:
    """A node labelled as a provider but never bound (a rogue), and one whose provider the
    operator suspended, offer nothing, whatever VRAM they declare."""
    bob = provider(sqlite_engine, r, plans, "bob@example.com")
    bind(sqlite_engine, bob, NODE_B, [])
    registry.review(sqlite_engine, bob, ProviderReview.suspended)
    cluster.alive += [alive(NODE_B, A_24GB), alive(ROGUE, {"GPU": 8.0, VRAM_RESOURCE: 640})]
    assert reconciler.tick() == Plan({}, local=True)
    registry.review(sqlite_engine, bob, ProviderReview.approved)
    plan = reconciler.tick()
    assert plan is not None and set(plan.models) == {"darkgpu-tiny", "darkgpu-tiny-b"}


def test_binding_again_replaces_the_allow_list(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans
) -> None:
    alice = provider(sqlite_engine, r, plans, "alice@example.com")
    bind(sqlite_engine, alice, NODE_A, ["darkgpu-tiny-b", "darkgpu-tiny", "darkgpu-tiny-b"])
    # in the provider's order of preference, each once
    assert nodes.allow_lists(sqlite_engine) == {NODE_A: ("darkgpu-tiny-b", "darkgpu-tiny")}
    bind(sqlite_engine, alice, NODE_A, [])
    assert nodes.allow_lists(sqlite_engine) == {NODE_A: ()}


def test_a_gpu_that_fits_two_models_serves_the_one_asked_for_most(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, cluster: Recorded, tmp_path: Path
) -> None:
    """Alice's node fits one replica of either model and prefers darkgpu-tiny: it serves that
    one, and the other has no application, until the ingresses' request totals make the other
    the one asked for most (HOLD times as much per replica): then the GPU changes models."""
    alice = provider(sqlite_engine, r, plans, "alice@example.com")
    bind(sqlite_engine, alice, NODE_A, ["darkgpu-tiny", "darkgpu-tiny-b"])
    cluster.alive.append(alive(NODE_A, A_24GB))
    now = [1000.0]
    settings = Settings(data_dir=tmp_path)
    reconciler = SupplyReconciler(
        CATALOG, settings, sqlite_engine, r, {HEAD},
        pools={TrustTier.basic: cluster.pool(settings)},
        clock=lambda: now[0],
    )  # fmt: skip
    reconciler.tick()
    assert cluster.taken() == [("delete", "model-darkgpu-tiny-b", None),
                               ("deploy", "darkgpu-tiny", ModelSupply(1, 1))]  # fmt: skip
    assert published(r).models["darkgpu-tiny-b"] == ModelSupply(0, 0)  # 503 model_warming
    r.hset(redis_keys.SUPPLY_REQUESTS, mapping={"darkgpu-tiny": 10, "darkgpu-tiny-b": 14})
    now[0] += 60
    reconciler.tick()
    assert cluster.taken() == []  # a first reading: no rate yet
    r.hset(redis_keys.SUPPLY_REQUESTS, mapping={"darkgpu-tiny": 70, "darkgpu-tiny-b": 74})
    now[0] += 60
    reconciler.tick()
    assert cluster.taken() == []  # as much asked of each: the one serving keeps the GPU
    r.hset(redis_keys.SUPPLY_REQUESTS, mapping={"darkgpu-tiny": 80, "darkgpu-tiny-b": 374})
    now[0] += 60
    reconciler.tick()
    assert cluster.taken() == [("delete", "model-darkgpu-tiny", None),
                               ("deploy", "darkgpu-tiny-b", ModelSupply(1, 1))]  # fmt: skip


async def settled(view: SupplyView) -> Plan | None:
    """The reading of a turn started now (a reading is taken in the background)."""
    await view.plan()
    await asyncio.sleep(0.1)
    return await view.plan()


def test_the_ingress_reads_the_plan_reports_demand_and_measures_the_load(r: redis.Redis) -> None:
    async def main() -> None:
        client = aredis.Redis.from_url(billing.REDIS_URL)
        view = SupplyView(client, default_load_s=60, ttl_s=0.0)
        try:
            assert await view.plan() is None  # no reconciler yet
            plan = Plan({"m": ModelSupply(0, 2)}, local=False)
            r.set(redis_keys.SUPPLY_PLAN, plan.to_json())
            view.asked("m")
            assert view.retry_after_s("m") == 60  # nothing measured: the setting
            await asyncio.sleep(0.2)
            view.online("m")  # Serve pushed its first running replica
            assert await settled(view) == plan
            assert time.time() - float(r.hget(redis_keys.SUPPLY_ASKED, "m")) < 10
            assert r.hget(redis_keys.SUPPLY_REQUESTS, "m") == b"1"  # added to the total
            load_s = float(r.hget(redis_keys.SUPPLY_LOAD_S, "m"))
            for key in (redis_keys.SUPPLY_ASKED, redis_keys.SUPPLY_REQUESTS,
                        redis_keys.SUPPLY_LOAD_S):  # fmt: skip
                assert 0 < r.ttl(key) <= redis_keys.SUPPLY_TTL_S  # the state Redis: all expire
            assert 0.2 <= load_s < 5
            # the next warming is told the measured load
            assert view.retry_after_s("m") == max(1, math.ceil(load_s))
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_warming_that_ended_with_the_model_removed_measures_nothing(r: redis.Redis) -> None:
    """A model told warming, then removed from the plan before any replica ran (its provider
    left): its next warming counts down from the measured load again, not from the first, and
    its eventual load is measured from the warming that brought it (never a load time of the
    whole interval, which every ingress's Retry-After would then repeat)."""

    async def main() -> None:
        client = aredis.Redis.from_url(billing.REDIS_URL)
        view = SupplyView(client, default_load_s=60, ttl_s=0.0)
        try:
            r.set(redis_keys.SUPPLY_PLAN, Plan({"m": ModelSupply(1, 1)}, local=False).to_json())
            await settled(view)
            assert view.retry_after_s("m") == 60
            r.set(redis_keys.SUPPLY_PLAN, Plan({}, local=False).to_json())  # it went away
            await settled(view)
            await asyncio.sleep(1.2)
            r.set(redis_keys.SUPPLY_PLAN, Plan({"m": ModelSupply(1, 1)}, local=False).to_json())
            await settled(view)
            assert view.retry_after_s("m") == 60  # a new warming (was: 59, since the first)
            view.online("m")
            await settled(view)
            assert float(r.hget(redis_keys.SUPPLY_LOAD_S, "m")) < 1
        finally:
            await client.aclose()

    asyncio.run(main())


def test_refused_requests_cannot_buy_gpus(r: redis.Redis) -> None:
    """A caller with a valid key sends a thousand requests for a model that has no replica
    (each refused 503 model_warming, at no cost): they count as one request of demand, not a
    thousand, so they cannot take a GPU from a model that paying callers use. Two accounts
    count two; requests that were admitted each count."""

    async def main() -> None:
        client = aredis.Redis.from_url(billing.REDIS_URL)
        view = SupplyView(client, default_load_s=60, ttl_s=0.0)
        try:
            for _ in range(1000):
                view.asked("cold", refused_account=7)
            view.asked("cold", refused_account=8)
            for _ in range(5):
                view.asked("paid")
            await settled(view)
            for _ in range(1000):  # the next turn: still within the minute
                view.asked("cold", refused_account=7)
            await settled(view)
            totals = r.hgetall(redis_keys.SUPPLY_REQUESTS)
            assert totals == {b"cold": b"2", b"paid": b"5"}
            assert r.hget(redis_keys.SUPPLY_ASKED, "cold")  # it is still asked for: warm
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_plan_that_is_not_a_plan_keeps_the_last_reading(r: redis.Redis) -> None:
    async def main() -> None:
        client = aredis.Redis.from_url(billing.REDIS_URL)
        view = SupplyView(client, default_load_s=60, ttl_s=0.0)
        try:
            good = Plan({"m": ModelSupply(1, 1)}, local=True)
            r.set(redis_keys.SUPPLY_PLAN, good.to_json())
            assert await view.plan() == good
            r.set(redis_keys.SUPPLY_PLAN, json.dumps({"models": {"m": {}}}))
            assert await settled(view) == good
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_models_code_version_ignores_its_bounds_only(tmp_path: Path) -> None:
    """The version Serve compares on a deploy: new bounds keep the replicas (same version),
    anything else about the engine restarts them (another version)."""
    settings = Settings(data_dir=tmp_path)
    model = load_catalog(CONFIGS_DIR / "models.toml").get("qwen3.5-7b")
    version = deployment_version(llm_config_for(model, settings, ModelSupply(0, 1)))
    assert version == deployment_version(llm_config_for(model, settings, ModelSupply(2, 4)))
    other = Settings(data_dir=tmp_path, max_ongoing_requests=8)
    assert version != deployment_version(llm_config_for(model, other, ModelSupply(0, 1)))


def test_each_pool_is_planned_on_its_own_tiers_nodes_and_the_plans_are_summed(
    sqlite_engine: Engine, r: redis.Redis, plans: Plans, tmp_path: Path
) -> None:
    """The basic pool holds alice's node, the verified pool bob's (verified) and one of
    alice's that got in there (basic: it counts for nothing, and the warden drains it). Each
    pool gets the replicas its own nodes hold; the published plan is their sum. A pool whose
    gateway stops answering keeps its last plan in what is published."""
    alice = provider(sqlite_engine, r, plans, "alice@example.com")
    bob = provider(sqlite_engine, r, plans, "bob@example.com")
    with Session(sqlite_engine) as session, session.begin():
        session.get(Provider, bob).trust_tier = TrustTier.verified.value
    for who, node in ((alice, NODE_A), (bob, NODE_B), (alice, ROGUE)):
        bind(sqlite_engine, who, node, ["darkgpu-tiny"])
    basic, verified = Recorded(), Recorded()
    basic.alive.append(alive(NODE_A, A_24GB))
    verified.alive = [alive(HEAD, {"CPU": 8.0}), alive(NODE_B, A_24GB), alive(ROGUE, A_24GB)]
    settings = Settings(data_dir=tmp_path, min_replicas=1)
    verified_pool = verified.pool(settings)
    reconciler = SupplyReconciler(
        CATALOG, settings, sqlite_engine, r, {HEAD},
        pools={TrustTier.basic: basic.pool(settings), TrustTier.verified: verified_pool},
    )  # fmt: skip
    reconciler.tick()
    one = ("deploy", "darkgpu-tiny", ModelSupply(1, 1))
    assert one in basic.taken() and one in verified.taken()  # ROGUE holds no slot
    assert published(r).models["darkgpu-tiny"] == ModelSupply(2, 2)

    def away() -> list[nodes.ClusterNode]:
        raise ConnectionError("the verified pool's gateway is down")

    verified_pool.nodes = away  # type: ignore[method-assign]
    basic.alive.pop()  # alice's node leaves the basic pool
    reconciler.tick()
    assert published(r).models["darkgpu-tiny"] == ModelSupply(1, 1)  # the verified pool's
