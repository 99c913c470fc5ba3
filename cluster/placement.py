"""Which catalog models the cluster can serve, and what a replica of each asks for."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cluster.catalog import Catalog, CatalogModel
from kernel.labels import VRAM_RESOURCE


@dataclass(frozen=True)
class NodeCapacity:
    """What one alive node offers: its GPUs and the VRAM of each (GiB)."""

    gpus: int
    vram_gb_per_gpu: int

    vram_gb: int = 0  # the node's whole `vram_gb` resource (a CPU node may declare some)

    @classmethod
    def from_resources(cls, resources: Mapping[str, float]) -> NodeCapacity:
        gpus = int(resources.get("GPU", 0))
        vram = int(resources.get(VRAM_RESOURCE, 0))
        return cls(gpus=gpus, vram_gb_per_gpu=vram // gpus if gpus else 0, vram_gb=vram)

    def fits(self, model: CatalogModel) -> bool:
        if model.is_local:  # the CPU engine: VRAM only, as a count (see replica_bundles)
            return self.vram_gb >= model.min_vram_gb
        return (
            self.gpus >= model.tensor_parallel_size
            and self.vram_gb_per_gpu >= model.vram_gb_per_gpu
        )


def cluster_capacity() -> list[NodeCapacity]:
    """The capacity of every alive node of the connected Ray cluster."""
    import ray

    nodes = ray.nodes()  # type: ignore[no-untyped-call]  # Ray leaves it unannotated
    return [NodeCapacity.from_resources(node["Resources"]) for node in nodes if node["Alive"]]


def deployable_models(catalog: Catalog, nodes: Iterable[NodeCapacity]) -> list[CatalogModel]:
    """Catalog models some node can hold; where no node has a GPU, the local models only
    (those with a min VRAM only where some node offers that much `vram_gb`: CPU nodes of a
    test cluster standing in for providers).

    Catalog models whose min VRAM no node offers are listed by the API but not deployed.
    """
    nodes = list(nodes)
    if not any(node.gpus for node in nodes):
        return [
            m
            for m in catalog.models
            if m.is_local and (not m.min_vram_gb or any(n.fits(m) for n in nodes))
        ]
    return [m for m in catalog.models if not m.is_local and any(n.fits(m) for n in nodes)]


def replica_bundles(model: CatalogModel) -> list[dict[str, float]]:
    """Placement-group bundles of one replica: one per GPU, each with its share of VRAM.

    A local model (the CPU engine) takes one CPU, and its min VRAM as a count where it
    has one, so it lands only on nodes that declare that much `vram_gb`."""
    if model.is_local:
        return [{"CPU": 1, VRAM_RESOURCE: model.min_vram_gb}] if model.min_vram_gb else [{"CPU": 1}]
    return [{"GPU": 1, VRAM_RESOURCE: model.vram_gb_per_gpu}] * model.tensor_parallel_size
