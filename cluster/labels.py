"""Names of the node labels and custom resources that describe a provider's node.

Ray Serve LLM's `accelerator_type` accepts only data-centre GPU names, so placement uses a
custom resource counted in GiB (`vram_gb`: "at least N GiB" is a resource request) and node
labels (provider id, trust tier, GPU model) read back by replicas and label selectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

PROVIDER_ID_LABEL = "darkgpu.io/provider-id"
TRUST_TIER_LABEL = "darkgpu.io/trust-tier"
GPU_MODEL_LABEL = "darkgpu.io/gpu-model"
VRAM_RESOURCE = "vram_gb"

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

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> NodeIdentity:
        tier = labels.get(TRUST_TIER_LABEL, TrustTier.basic)
        return cls(
            provider_id=labels.get(PROVIDER_ID_LABEL, LOCAL_PROVIDER_ID),
            trust_tier=TrustTier(tier) if tier in TrustTier.__members__ else TrustTier.basic,
            gpu_model=labels.get(GPU_MODEL_LABEL),
        )

    def labels(self) -> dict[str, str]:
        out = {PROVIDER_ID_LABEL: self.provider_id, TRUST_TIER_LABEL: self.trust_tier.value}
        if self.gpu_model:
            out[GPU_MODEL_LABEL] = self.gpu_model
        return out


def format_labels(labels: Mapping[str, str]) -> str:
    """The `ray start --labels` form: `k1=v1,k2=v2`."""
    for key, value in labels.items():
        if any(c in f"{key}{value}" for c in ",= "):
            raise ValueError(f"label {key}={value!r} may not contain ',', '=' or spaces")
    return ",".join(f"{k}={v}" for k, v in labels.items())
