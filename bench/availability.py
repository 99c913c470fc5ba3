"""What knowing which models are online costs an ingress replica, old way and new, side by side.

A Ray cluster of its own (`ray.init(address="local")`) runs a `Model` deployment (one replica)
and a `Probe` replica standing for the ingress. In the probe, for the same number of calls:

1. `serve.status()` (what `serve_app/availability.py` polled once a second before issue 13),
2. `ReplicaAvailability.online()` (the set Serve's long poll pushes, read per request now),

each timed in the probe's own process: CPU ms (process time, every thread) and wall ms per call.

    .venv/bin/python bench/availability.py [--calls 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_app.availability import ReplicaAvailability  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@serve.deployment
class Model:
    def __call__(self) -> str:
        return "ok"


@serve.deployment
class Probe:
    def __init__(self, model: Any) -> None:
        self._availability = ReplicaAvailability(
            {"m": (serve.get_replica_context().app_name, "Model")}
        )

    async def measure(self, calls: int) -> dict[str, tuple[float, float]]:
        assert "m" in await self._availability.online()  # started, first reading in
        costs = {}
        for name, call in (("serve.status()", self._status), ("online()", self._online)):
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(calls):
                await call()
            costs[name] = (
                (time.process_time() - cpu) * 1000 / calls,
                (time.perf_counter() - wall) * 1000 / calls,
            )
        return costs

    async def _status(self) -> None:
        app = serve.status().applications["bench"]
        assert app.deployments["Model"].replica_states

    async def _online(self) -> None:
        assert "m" in await self._availability.online()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    try:
        serve.start(http_options={"location": "NoServer"})
        probe = serve.run(Probe.bind(Model.bind()), name="bench", route_prefix=None)
        costs = probe.measure.remote(args.calls).result(timeout_s=600)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\n{args.calls} calls each, in one ingress-like replica\n")
    print("| call | CPU ms per call | wall ms per call |")
    print("|---|---:|---:|")
    for name, (cpu, wall) in costs.items():
        print(f"| {name} | {cpu:.3f} | {wall:.3f} |")


if __name__ == "__main__":
    main()
