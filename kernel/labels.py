"""Names of the node labels and custom resources that describe a provider's node.

Ray Serve LLM's `accelerator_type` accepts only data-centre GPU names, so placement uses a
custom resource counted in GiB (`vram_gb`: "at least N GiB" is a resource request) and node
labels (provider id, trust tier, GPU model) read back by replicas and label selectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

PROVIDER_ID_LABEL = "darkgpu.io/provider-id"
TRUST_TIER_LABEL = "darkgpu.io/trust-tier"
GPU_MODEL_LABEL = "darkgpu.io/gpu-model"
PRICE_FLOOR_LABEL = "darkgpu.io/price-floor-pct"
"""The provider's price floor, percent above the catalog price (`price_floor_pct`)."""
VRAM_RESOURCE = "vram_gb"
MODEL_RESOURCE_PREFIX = "darkgpu_model:"
MODEL_RESOURCE_UNITS = 1000
"""A node declares `darkgpu_model:<id>` (this many units) for each catalog model its provider
lets it serve, and each replica asks one unit of its model's: Ray places a model's replica
only on a node that allows it (`cluster.placement.replica_bundles`)."""
ROLE_LABEL = "darkgpu.io/role"
CONTROL_SELECTOR = {ROLE_LABEL: "control"}
"""The operator's own nodes (the head): the only ones that run the ingress (it sees API keys)
and the billing actor. Provider nodes are not trusted with either: they run model replicas."""

LOCAL_PROVIDER_ID = "local"
"""The provider id of the operator's own head node (a development machine or CI)."""


class TrustTier(StrEnum):
    basic = "basic"  # consumer GPU, software-attested
    verified = "verified"  # H100/H200 with NVIDIA Confidential Computing on


@dataclass(frozen=True)
class NodeIdentity:
    provider_id: str
    trust_tier: TrustTier
    gpu_model: str | None = None
    price_floor_pct: int = 0

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> NodeIdentity:
        tier = labels.get(TRUST_TIER_LABEL, TrustTier.basic)
        return cls(
            provider_id=labels.get(PROVIDER_ID_LABEL, LOCAL_PROVIDER_ID),
            trust_tier=TrustTier(tier) if tier in TrustTier.__members__ else TrustTier.basic,
            gpu_model=labels.get(GPU_MODEL_LABEL),
            price_floor_pct=_pct(labels.get(PRICE_FLOOR_LABEL)),
        )

    def labels(self) -> dict[str, str]:
        out = {PROVIDER_ID_LABEL: self.provider_id, TRUST_TIER_LABEL: self.trust_tier.value}
        if self.gpu_model:
            out[GPU_MODEL_LABEL] = self.gpu_model
        if self.price_floor_pct:
            out[PRICE_FLOOR_LABEL] = str(self.price_floor_pct)
        return out


def _pct(value: str | None) -> int:
    """A price floor label as a whole percentage; missing or malformed is 0."""
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0


def model_resource(model_id: str) -> str:
    return MODEL_RESOURCE_PREFIX + model_id


def model_resources(model_ids: Iterable[str]) -> dict[str, float]:
    """The resources a node declares to serve these models."""
    return {model_resource(m): float(MODEL_RESOURCE_UNITS) for m in sorted(set(model_ids))}


def format_labels(labels: Mapping[str, str]) -> str:
    """The `ray start --labels` form: `k1=v1,k2=v2`."""
    for key, value in labels.items():
        if any(c in f"{key}{value}" for c in ",= "):
            raise ValueError(f"label {key}={value!r} may not contain ',', '=' or spaces")
    return ",".join(f"{k}={v}" for k, v in labels.items())
