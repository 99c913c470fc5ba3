"""How many replicas each catalog model may have: the supply reconciler's decision, one pure
function (`plan_supply`) of the nodes online, the providers' allow-lists and the demand.

A model is deployed while some node may hold it: alive, bound to an approved provider (or a
control node), with the VRAM (`cluster.placement.NodeCapacity.fits`), and whose provider
allows it (`models = [...]` in its `provider.toml`; empty: any model that fits). A model
nobody allows, or that no node fits, is not deployed at all, and the API lists it as
unavailable.

The slots of the nodes that are not draining (one per GPU group of a model's tensor-parallel
size; for the CPU engine's models, one per `min_vram_gb` of the node's `vram_gb`) are shared
out one replica at a time, each to the model that needs it most:

1. a warm model below its floor (`min_replicas`: the catalog's, else the operator's);
2. then the most requests per second per replica (`DemandRate`); a model keeps a slot it held
   in the last plan unless another asks `HOLD` times as much per replica (hysteresis: a
   shift in demand moves a GPU, noise does not);
3. then the model the node's provider prefers (the order of its `models` list), then the
   fewest replicas, then the catalog's order.

Each takes the free slot of a node whose provider prefers it most, and of those the node that
serves the fewest models (so that a model only a few nodes allow keeps room there).
Nothing is shared out beyond `max_replicas` per model. A model's bounds are then
`[min(floor, slots), slots]`: Serve's autoscaler moves the count between the two by its
ongoing requests. A model that got no slot (others need them more) stays in the plan with
`[0, 0]`: it has no application and no replica, and its requests are answered 503
`model_warming` (they count as demand: they may win it a slot).

Warm and cold: a model keeps its floor while it had a request in the last `cool_after_s`
seconds (always, where `cool_after_s` is None); a cold one scales to zero. The window is the
hysteresis: demand warms a model at once, only a long silence cools it.

A draining node adds no slot; a model it serves stays deployed, warm while it is, so that
Serve starts its replacement before the draining replica stops.

The plan bounds how many replicas a model has, not where Ray places each: every node that
allows a model declares its resource (`cluster.placement.replica_bundles`). Where one GPU is
allowed several models, a pending replica may take the slot the plan counted for another;
the plan never asks for more replicas than the nodes hold together, so the other waits only
until a replica scales down (see the notes of the supply issue).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cluster.catalog import Catalog, CatalogModel
from cluster.placement import NodeCapacity


@dataclass(frozen=True)
class SupplyNode:
    """An alive node that may serve: a control node, or one bound to an approved provider."""

    node_id: str
    capacity: NodeCapacity
    models: tuple[str, ...] = ()  # the provider's allow-list, preferred first; empty: any
    draining: bool = False

    def serves(self, model: CatalogModel) -> bool:
        return (not self.models or model.id in self.models) and self.capacity.fits(model)

    def slots(self, model: CatalogModel) -> int:
        """How many replicas of `model` this node holds at once (it `serves` it)."""
        return self.units // self.cost(model)

    @property
    def units(self) -> int:
        """What replicas share: GPUs; for the CPU engine, GiB of declared VRAM (at least 1)."""
        return self.capacity.gpus or max(self.capacity.vram_gb, 1)

    def cost(self, model: CatalogModel) -> int:
        """The units one replica of `model` takes (a local model with no VRAM: the node)."""
        if model.is_local:
            return model.min_vram_gb or self.units
        return model.tensor_parallel_size

    def rank(self, model_id: str) -> int:
        """Its provider's preference for a model: 0 first; every model alike with no list."""
        return self.models.index(model_id) if model_id in self.models else len(self.models)


@dataclass(frozen=True)
class ModelSupply:
    """What a deployed model's autoscaler keeps: between `min_replicas` and `max_replicas`
    (0: no slot for it now)."""

    min_replicas: int
    max_replicas: int

    @property
    def warm(self) -> bool:
        return self.min_replicas > 0

    def to_json(self) -> dict[str, int]:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas}


@dataclass(frozen=True)
class SupplyPolicy:
    min_replicas: int = 1  # a warm model's floor, where the catalog sets none
    max_replicas: int = 4  # the most replicas of one model
    cool_after_s: float | None = None  # silence after which a model scales to zero; None: never


# How much more demand per replica another model needs to take a slot a model held in the
# last plan.
HOLD = 1.5


class DemandRate:
    """Requests per second per model, from the running totals of requests the ingresses keep
    (`dg:supply:requests`): a mean over the last minutes, each tick weighing the new rate in
    by how long it covers (half of the weight is the last `half_life_s`)."""

    def __init__(self, half_life_s: float = 120.0) -> None:
        self._half_life_s = half_life_s
        self._totals: Mapping[str, float] = {}
        self._at: float | None = None
        self.rates: dict[str, float] = {}

    def update(self, totals: Mapping[str, float], now_s: float) -> dict[str, float]:
        if self._at is not None and now_s > self._at:
            covered = now_s - self._at
            old = 0.5 ** (covered / self._half_life_s)
            for model in {*totals, *self.rates}:
                # a total that went down (its key expired): nothing counted this time
                new = max(0.0, totals.get(model, 0.0) - self._totals.get(model, 0.0)) / covered
                self.rates[model] = old * self.rates.get(model, 0.0) + (1 - old) * new
        self._totals, self._at = dict(totals), now_s
        return self.rates


def plan_supply(
    catalog: Catalog,
    nodes: Iterable[SupplyNode],
    last_request_s: Mapping[str, float],
    policy: SupplyPolicy,
    now_s: float,
    demand: Mapping[str, float] | None = None,
    held: Mapping[str, ModelSupply] | None = None,
) -> dict[str, ModelSupply]:
    """model id -> its bounds, for every model that is to be deployed now.

    Where no node has a GPU (this machine, a test cluster of CPU nodes standing for
    providers) the CPU engine's local models are the catalog; where one has, only the others.
    `last_request_s`: model id -> when it was last asked for (the clock of `now_s`);
    `demand`: model id -> requests per second; `held`: the last plan."""
    nodes = list(nodes)
    demand, held = demand or {}, held or {}
    any_gpu = any(node.capacity.gpus for node in nodes)
    models = [
        model
        for model in catalog.models
        if model.is_local != any_gpu and any(node.serves(model) for node in nodes)
    ]
    floor = {model.id: _floor(model, last_request_s, policy, now_s) for model in models}
    slots = _share_slots(models, [n for n in nodes if not n.draining], floor, demand, held, policy)
    plan = {}
    for model in models:
        got = slots[model.id]
        keep = got or int(any(node.draining and node.serves(model) for node in nodes))
        plan[model.id] = ModelSupply(min(floor[model.id], keep), keep)
    return plan


def _floor(
    model: CatalogModel, last_request_s: Mapping[str, float], policy: SupplyPolicy, now_s: float
) -> int:
    """The replicas a model keeps while warm (asked for within `cool_after_s`), else 0."""
    asked = last_request_s.get(model.id)
    warm = policy.cool_after_s is None or (
        asked is not None and now_s - asked < policy.cool_after_s
    )
    if not warm:
        return 0
    return policy.min_replicas if model.min_replicas is None else model.min_replicas


def _share_slots(
    models: list[CatalogModel],
    nodes: list[SupplyNode],
    floor: Mapping[str, int],
    demand: Mapping[str, float],
    held: Mapping[str, ModelSupply],
    policy: SupplyPolicy,
) -> Counter[str]:
    """How many slots each model gets: one at a time, to the model that needs one most
    (the module's rules), on the node that suits it best. Each model's nodes are sorted once
    (preference, then width); a node full for a model stays full (room only shrinks), so
    each list is walked once: the work is the nodes times the models, plus the slots times
    the models."""
    free = {node.node_id: node.units for node in nodes}
    got: Counter[str] = Counter()
    order = {model.id: i for i, model in enumerate(models)}
    serving = {m.id: [n for n in nodes if n.serves(m)] for m in models}
    width = Counter(n.node_id for m in models for n in serving[m.id])

    def suits(model_id: str) -> Callable[[SupplyNode], tuple[int, int]]:
        return lambda node: (node.rank(model_id), width[node.node_id])

    queue = {m.id: deque(sorted(serving[m.id], key=suits(m.id))) for m in models}

    def best_node(model: CatalogModel) -> SupplyNode | None:
        """The node this model's next replica takes (None: no room left anywhere)."""
        if got[model.id] >= policy.max_replicas:
            return None
        nodes_left = queue[model.id]
        while nodes_left and free[nodes_left[0].node_id] < nodes_left[0].cost(model):
            nodes_left.popleft()
        return nodes_left[0] if nodes_left else None

    def need(model: CatalogModel, node: SupplyNode) -> tuple[float, ...]:
        count, asked = got[model.id], demand.get(model.id, 0.0)
        holds = count < held.get(model.id, ModelSupply(0, 0)).max_replicas
        per_replica = asked * (HOLD if holds else 1.0) / (count + 1)
        preferred = node.rank(model.id)
        return (count < floor[model.id], per_replica, holds, -preferred, -count, -order[model.id])

    while True:
        open_ = [(model, node) for model in models if (node := best_node(model)) is not None]
        if not open_:
            return got
        model, node = max(open_, key=lambda pair: need(*pair))
        free[node.node_id] -= node.cost(model)
        got[model.id] += 1
