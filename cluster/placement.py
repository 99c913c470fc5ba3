"""What a node offers, whether a catalog model fits it, and what a replica of each asks for
(which models are deployed where: `cluster.supply`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cluster.catalog import CatalogModel
from kernel.labels import VRAM_RESOURCE, model_resource


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


def replica_bundles(model: CatalogModel) -> list[dict[str, float]]:
    """Placement-group bundles of one replica: one per GPU, each with its share of VRAM, the
    first also with a unit of the model's own resource, which only the nodes whose provider
    allows the model declare (`kernel.labels.model_resources`).

    A local model (the CPU engine) takes one CPU, and its min VRAM as a count where it
    has one, so it lands only on nodes that declare that much `vram_gb`."""
    allowed = {model_resource(model.id): 1.0}
    if model.is_local:
        vram = {VRAM_RESOURCE: model.min_vram_gb} if model.min_vram_gb else {}
        return [{"CPU": 1, **vram, **allowed}]
    gpu: dict[str, float] = {"GPU": 1, VRAM_RESOURCE: model.vram_gb_per_gpu}
    return [{**gpu, **allowed}] + [gpu] * (model.tensor_parallel_size - 1)
