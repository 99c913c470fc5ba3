"""The provider earnings calculator: what a GPU of a given size could earn serving each
catalog model that fits it, at the catalog's prices, in three tiers of stated assumptions.

The spec asks for three tiers with conservative as the default. Demand is the one thing the
platform cannot promise, so each tier is a pair of stated guesses: the share of the day the
GPU spends serving requests (utilisation) and how fast it generates while it does. Speed
falls with model size: a tier's tokens per second are for a model that needs 8 GB, and a
model that needs V GB is taken to generate 8/V as fast. Each request is taken to carry
`PROMPT_TOKENS_PER_OUTPUT_TOKEN` prompt tokens per generated token (both are billed). The
provider keeps `kernel.money.PROVIDER_SHARE_PCT` of what the requests cost, split exactly
as settlement splits it (`split_cost`). Money stays in integer nano-dollars throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.catalog import Catalog, CatalogModel
from kernel.money import split_cost

DAYS_PER_MONTH = 30
SECONDS_PER_DAY = 86_400
REFERENCE_VRAM_GB = 8  # a tier's tokens per second are for a model this size
PROMPT_TOKENS_PER_OUTPUT_TOKEN = 3


@dataclass(frozen=True)
class Tier:
    name: str
    label: str
    utilisation_pct: int  # share of the day spent serving requests
    output_tokens_per_s: int  # while serving, for a model of REFERENCE_VRAM_GB
    meaning: str


TIERS = (
    Tier("conservative", "Conservative", 10, 50,
         "little demand for your model: one request at a time, a tenth of the day"),
    Tier("typical", "Typical", 25, 100,
         "steady demand: a few requests at once, a quarter of the day"),
    Tier("optimistic", "Optimistic", 50, 200,
         "strong demand: many requests batched together, half of the day"),
)  # fmt: skip
TIER_BY_NAME = {t.name: t for t in TIERS}
DEFAULT_TIER = "conservative"


@dataclass(frozen=True)
class Gpu:
    vram_gb: int
    examples: str


# Common NVIDIA cards by memory (a guide to which size is yours, not a list of what is allowed).
GPUS = (
    Gpu(8, "RTX 3070, RTX 4060"),
    Gpu(12, "RTX 3060 12 GB, RTX 4070"),
    Gpu(16, "RTX 4060 Ti 16 GB, RTX 4080"),
    Gpu(24, "RTX 3090, RTX 4090"),
    Gpu(32, "RTX 5090"),
    Gpu(48, "RTX A6000, L40S"),
    Gpu(80, "A100 80 GB, H100"),
    Gpu(141, "H200"),
)


@dataclass(frozen=True)
class Estimate:
    model: CatalogModel
    output_tokens_per_s: int
    output_tokens_per_day: int
    prompt_tokens_per_day: int
    cost_per_day_nusd: int  # what the requests of a day cost their clients
    earned_per_day_nusd: int  # the provider's share of it
    earned_per_month_nusd: int


def fits(model: CatalogModel, vram_gb: int) -> bool:
    """Served on one GPU of this size: the catalog's memory need, on a single GPU."""
    return not model.is_local and model.tensor_parallel_size == 1 and model.min_vram_gb <= vram_gb


def estimate(model: CatalogModel, tier: Tier) -> Estimate:
    speed = max(1, tier.output_tokens_per_s * REFERENCE_VRAM_GB // max(1, model.min_vram_gb))
    output = SECONDS_PER_DAY * tier.utilisation_pct * speed // 100
    prompt = output * PROMPT_TOKENS_PER_OUTPUT_TOKEN
    cost = output * model.output_nusd_per_token + prompt * model.input_nusd_per_token
    earned, _ = split_cost(cost)
    month, _ = split_cost(cost * DAYS_PER_MONTH)
    return Estimate(model, speed, output, prompt, cost, earned, month)


@dataclass(frozen=True)
class GpuEstimates:
    gpu: Gpu
    rows: list[Estimate]


def table(catalog: Catalog, tier: Tier, vram_gb: int | None = None) -> list[GpuEstimates]:
    """Per GPU size (or the one chosen), an estimate for every catalog model that fits it, in
    the catalog's order."""
    gpus = [g for g in GPUS if vram_gb is None or g.vram_gb == vram_gb]
    out = []
    for gpu in gpus:
        rows = [estimate(m, tier) for m in catalog.models if fits(m, gpu.vram_gb)]
        out.append(GpuEstimates(gpu, rows))
    return out
