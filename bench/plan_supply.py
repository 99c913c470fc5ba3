"""What the supply reconciler's decision costs as the cluster grows: milliseconds per
`cluster.supply.plan_supply` call (it runs every `supply_every_s`, 2 s by default), for
100 to 5,000 provider nodes of mixed sizes, half of them with an allow-list of three catalog
models, and `max_replicas` 4 (the default) or 64.

    .venv/bin/python bench/plan_supply.py
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

# Run as a script, this folder comes first on the path: the repository's root instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from cluster.catalog import load_catalog  # noqa: E402
from cluster.placement import NodeCapacity  # noqa: E402
from cluster.supply import SupplyNode, SupplyPolicy, plan_supply  # noqa: E402
from core.settings import CONFIGS_DIR  # noqa: E402
from kernel.labels import VRAM_RESOURCE  # noqa: E402

ROUNDS = 5


def main() -> None:
    rng = random.Random(7)
    catalog = load_catalog(CONFIGS_DIR / "models.toml")
    ids = [model.id for model in catalog.models]
    demand = {model_id: rng.random() for model_id in ids}
    print("| nodes | max_replicas | ms per plan | replicas planned |")
    print("|---|---|---|---|")
    for count in (100, 1_000, 5_000):
        nodes = [
            SupplyNode(
                f"node-{i}",
                NodeCapacity.from_resources(
                    {"GPU": rng.choice([1, 2, 8]), VRAM_RESOURCE: rng.choice([24, 80, 640])}
                ),
                tuple(rng.sample(ids, 3)) if i % 2 else (),
            )
            for i in range(count)
        ]
        for most in (4, 64):
            policy = SupplyPolicy(min_replicas=1, max_replicas=most)
            start = time.perf_counter()
            for _ in range(ROUNDS):
                plan = plan_supply(catalog, nodes, {}, policy, 0.0, demand)
            ms = (time.perf_counter() - start) * 1000 / ROUNDS
            planned = sum(supply.max_replicas for supply in plan.values())
            print(f"| {count:,} | {most} | {ms:.1f} | {planned} |")


if __name__ == "__main__":
    main()
