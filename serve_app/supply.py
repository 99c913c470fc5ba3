"""The supply reconciler: a Serve application per catalog model in each supply pool, kept on
the nodes that may hold it and sized by the demand, as `cluster.supply.plan_supply` decides.

Every `supply_every_s` the `supply` deployment (on a control node) reads the demand the
ingresses report (`dg:supply:asked`: when each model was last asked for;
`dg:supply:requests`: running totals, made a rate by `cluster.supply.DemandRate`) and, for
each pool (one per trust tier: `cluster.pools`), its nodes (its gateway lists its GCS's
table: resources, and which it drains: `serve_app.pool_admin`), which of them are the
platform's own (control nodes) or bound to an approved provider of the pool's tier with the
models it allows (SQL, `cluster.nodes`); plans that pool; sends it the models it wants with
their bounds (`PUT <pool>/models`: the pool deploys each whose bounds changed as an
application of its own and deletes those no node may hold any longer or that got no slot,
others needing the GPUs they fit more: `serve_app.pool_models`). Each pool is planned for the
whole demand (which tier a request will need is the request's, not known ahead), so a model
asked for is warm in every pool that can hold it. Once the pools took theirs, it publishes
the plan (`dg:supply:plan`, the state Redis) for the ingresses, the pools' plans summed:
which models are deployed, which are warm, and whether the platform serves the CPU engine's
models (no node of any pool has a GPU). A pool that cannot be reached keeps its last plan in
what is published. Serve's autoscaler then moves each model's replica count between the
bounds by the model's ongoing requests."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import ray
import redis as redis_lib
from ray import serve
from sqlalchemy.engine import Engine

from billing.redis_server import sync_client
from cluster import nodes
from cluster.catalog import Catalog, load_catalog
from cluster.placement import NodeCapacity
from cluster.supply import DemandRate, ModelSupply, SupplyNode, SupplyPolicy, plan_supply
from core.db import make_engine
from core.settings import Settings
from kernel import redis_keys
from kernel.labels import CONTROL_SELECTOR, MODEL_RESOURCE_PREFIX, TrustTier
from serve_app.pool_admin import pool_admins

logger = logging.getLogger("darkgpu.supply")
PLAN_TTL_S = 60  # a plan not refreshed for this long is gone: the ingresses then serve nothing


@dataclass(frozen=True)
class Plan:
    """The plan as published: the deployed models' bounds, and whether the platform serves
    the CPU engine's local models (no node has a GPU)."""

    models: Mapping[str, ModelSupply]
    local: bool

    def to_json(self) -> str:
        models = {m: s.to_json() for m, s in self.models.items()}
        return json.dumps({"models": models, "local": self.local})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Plan:
        found = json.loads(raw)
        models = {
            str(m): ModelSupply(int(s["min_replicas"]), int(s["max_replicas"]))
            for m, s in found["models"].items()
        }
        return cls(models, bool(found["local"]))


class PoolSupply(Protocol):
    """A pool as the reconciler drives it (`serve_app.pool_admin.PoolAdmin`)."""

    def nodes(self) -> list[nodes.ClusterNode]: ...

    def apply_models(self, wanted: Mapping[str, ModelSupply]) -> None: ...


def supply_nodes(
    found: Collection[nodes.ClusterNode],
    control: Collection[str],
    bound: Mapping[str, str],
    approved: Collection[str],
    allowed: Mapping[str, tuple[str, ...]],
    tiers: Mapping[str, TrustTier] | None = None,
    pool: TrustTier | None = None,
) -> list[SupplyNode]:
    """The alive nodes that may serve: control nodes that declare catalog models (any that
    fits: the basic pool's head; the verified pool's declares none), and nodes bound to an approved
    provider (of the `pool`'s tier, where `tiers` are given: the models it allows). Any other
    node (unbound, its provider suspended or of another tier) counts for nothing, whatever
    its labels say."""
    out = []
    for node in found:
        if not node.alive:
            continue
        own = node.node_id in control
        provider = bound.get(node.node_id)
        if not own and provider not in approved:
            continue
        if not own and tiers is not None and tiers.get(provider or "") is not pool:
            continue
        if own and not any(r.startswith(MODEL_RESOURCE_PREFIX) for r in node.resources):
            continue  # it declares no model: it can hold no replica
        out.append(
            SupplyNode(
                node.node_id,
                NodeCapacity.from_resources(node.resources),
                () if own else allowed.get(node.node_id, ()),
                node.draining,
            )
        )
    return out


def floats(found: Mapping[bytes, bytes]) -> dict[str, float]:
    """A Redis hash of numbers, as read: field -> value."""
    return {key.decode(): float(value) for key, value in found.items()}


class SupplyReconciler:
    """One tick: read, plan and apply each pool, publish. The pools are parameters (each with
    its node table and its deploy), so that tests can drive it against a recorded cluster."""

    def __init__(
        self,
        catalog: Catalog,
        settings: Settings,
        engine: Engine,
        state: redis_lib.Redis,
        control: Collection[str],
        *,
        pools: Mapping[TrustTier, PoolSupply],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._catalog = catalog
        self._settings = settings
        self._engine = engine
        self._state = state
        self._control = frozenset(control)
        self._pools = pools
        self._clock = clock
        self._policy = SupplyPolicy(
            min_replicas=settings.min_replicas,
            max_replicas=max(settings.max_replicas, settings.min_replicas),
            cool_after_s=settings.scale_to_zero_after_s or None,
        )
        self._demand = DemandRate()
        # each pool's last plan (the slots it holds), and whether a node of it has a GPU
        self._planned: dict[TrustTier, Mapping[str, ModelSupply]] = {}
        self._gpus: dict[TrustTier, bool] = {}

    def tick(self) -> Plan | None:
        try:
            return self._tick()
        except Exception as exc:  # noqa: BLE001 - SQL or Redis away: the next tick
            logger.warning("reconciling the supply failed: %r", exc)
            return None

    def _tick(self) -> Plan:
        with self._state.pipeline(transaction=False) as pipe:
            pipe.hgetall(redis_keys.SUPPLY_ASKED)
            pipe.hgetall(redis_keys.SUPPLY_REQUESTS)
            asked, totals = (floats(found) for found in pipe.execute())
        now = self._clock()
        demand = self._demand.update(totals, now)
        registry = (
            nodes.bindings(self._engine),
            nodes.approved_providers(self._engine),
            nodes.allow_lists(self._engine),
            nodes.provider_tiers(self._engine),
        )
        for tier, pool in self._pools.items():
            try:
                self._plan_pool(tier, pool, registry, asked, demand, now)
            except Exception as exc:  # noqa: BLE001 - its gateway away: its last plan stands
                logger.warning("reconciling the %s pool's supply failed: %r", tier.value, exc)
        models: dict[str, ModelSupply] = {}
        for planned in self._planned.values():
            for model, supply in planned.items():
                had = models.get(model, ModelSupply(0, 0))
                models[model] = ModelSupply(
                    had.min_replicas + supply.min_replicas, had.max_replicas + supply.max_replicas
                )
        plan = Plan(models, local=not any(self._gpus.values()))
        self._state.set(redis_keys.SUPPLY_PLAN, plan.to_json(), ex=PLAN_TTL_S)
        return plan

    def _plan_pool(
        self,
        tier: TrustTier,
        pool: PoolSupply,
        registry: tuple[
            Mapping[str, str],
            Collection[str],
            Mapping[str, tuple[str, ...]],
            Mapping[str, TrustTier],
        ],  # fmt: skip
        asked: Mapping[str, float],
        demand: Mapping[str, float],
        now: float,
    ) -> None:
        bound, approved, allowed, tiers = registry
        nodes_now = supply_nodes(pool.nodes(), self._control, bound, approved, allowed, tiers, tier)
        models = plan_supply(self._catalog, nodes_now, asked, self._policy, now, demand,
                             held=self._planned.get(tier))  # fmt: skip
        pool.apply_models({m: supply for m, supply in models.items() if supply.max_replicas})
        self._planned[tier] = models
        self._gpus[tier] = any(node.capacity.gpus for node in nodes_now)


@serve.deployment(
    name="supply",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0, "label_selector": CONTROL_SELECTOR},
)
class Supply:
    """The reconciler's thread, on a control node, as part of the platform's application."""

    def __init__(self, args: dict[str, Any]) -> None:
        settings = Settings(**args)
        self._reconciler = SupplyReconciler(
            load_catalog(settings.models_file),
            settings,
            make_engine(settings.database_url),
            sync_client(settings.state_redis_url),
            {ray.get_runtime_context().get_node_id(), *settings.control_node_ids},
            pools=pool_admins(settings),
        )
        self._every_s = settings.supply_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supply", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._reconciler.tick()
            self._stop.wait(self._every_s)

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the supply reconciler stopped")

    def __del__(self) -> None:
        self._stop.set()
