"""How many replicas each catalog model may have: the supply reconciler's decision, one pure
function (`plan_supply`) of the nodes online, the providers' allow-lists and the demand.

A model is deployed while some node may hold it: alive, bound to an approved provider (or a
control node), with the VRAM (`cluster.placement.NodeCapacity.fits`), and whose provider
allows it (`models = [...]` in its `provider.toml`; empty: any model that fits). Its replicas
are bounded by the slots of those nodes that are not draining (one per GPU group of its
tensor-parallel size; for the CPU engine's models, one per `min_vram_gb` of the node's
`vram_gb`), never more than `max_replicas`; Serve's autoscaler sizes it by its ongoing
requests between the two bounds. A model nobody allows, or that no node fits, is not
deployed at all, and the API lists it as unavailable.

Warm and cold: a model keeps `min_replicas` while it had a request in the last
`cool_after_s` seconds (always, where `cool_after_s` is None); a cold one scales to zero, and
its next request gets 503 `model_warming` while a replica starts (`serve_app.supply`). The
window is the hysteresis: demand warms a model at once, only a long silence cools it.

Where several models fit one GPU, each model may claim it; Serve places whichever replica it
starts first (see the closing notes of the supply issue: placement by demand and by the
provider's order of preference is not done here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cluster.catalog import Catalog, CatalogModel
from cluster.placement import NodeCapacity


@dataclass(frozen=True)
class SupplyNode:
    """An alive node that may serve: a control node, or one bound to an approved provider."""

    node_id: str
    capacity: NodeCapacity
    models: frozenset[str] = frozenset()  # the provider's allow-list; empty: any that fits
    draining: bool = False

    def serves(self, model: CatalogModel) -> bool:
        return (not self.models or model.id in self.models) and self.capacity.fits(model)

    def slots(self, model: CatalogModel) -> int:
        """How many replicas of `model` this node holds at once (it `serves` it)."""
        if model.is_local:
            return self.capacity.vram_gb // model.min_vram_gb if model.min_vram_gb else 1
        return self.capacity.gpus // model.tensor_parallel_size


@dataclass(frozen=True)
class ModelSupply:
    """What a deployed model's autoscaler keeps: between `min_replicas` and `max_replicas`."""

    min_replicas: int
    max_replicas: int

    @property
    def warm(self) -> bool:
        return self.min_replicas > 0

    def to_json(self) -> dict[str, int]:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas}


@dataclass(frozen=True)
class SupplyPolicy:
    min_replicas: int = 1  # a warm model's floor
    max_replicas: int = 4  # the most replicas of one model
    cool_after_s: float | None = None  # silence after which a model scales to zero; None: never


def plan_supply(
    catalog: Catalog,
    nodes: Iterable[SupplyNode],
    last_request_s: Mapping[str, float],
    policy: SupplyPolicy,
    now_s: float,
) -> dict[str, ModelSupply]:
    """model id -> its bounds, for every model that is to be deployed now.

    Where no node has a GPU (this machine, a test cluster of CPU nodes standing for
    providers) the CPU engine's local models are the catalog; where one has, only the others.
    `last_request_s`: model id -> when it was last asked for (the clock of `now_s`)."""
    nodes = list(nodes)
    any_gpu = any(node.capacity.gpus for node in nodes)
    plan = {}
    for model in catalog.models:
        if model.is_local == any_gpu:
            continue
        serving = [node for node in nodes if node.serves(model)]
        if not serving:
            continue
        slots = sum(node.slots(model) for node in serving if not node.draining)
        asked = last_request_s.get(model.id)
        warm = policy.cool_after_s is None or (
            asked is not None and now_s - asked < policy.cool_after_s
        )
        low = policy.min_replicas if warm else 0
        # a draining node's replica is replaced before it leaves: never fewer than one
        high = max(low, 1, min(policy.max_replicas, slots))
        plan[model.id] = ModelSupply(low, high)
    return plan
