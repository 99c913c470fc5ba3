"""What a member of the supply pool's Ray cluster finds there: run as a Ray driver with the
pool's token, as a provider's node holds it (`test_pool.py`). It prints, as JSON, every key of
the pool's key-value store with its value (Serve keeps each deployment's arguments there), the
environment of a worker on each node of the pool (a task pinned there), or whether the control
plane's cluster let it in with the same token."""

from __future__ import annotations

import base64
import json
import logging
import os
import sys

import ray
from ray.experimental import internal_kv
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


def pool_store() -> list[tuple[str, str]]:
    """Every (key, value) of the store, base64, in each namespace Ray and Serve use (a listing
    without a namespace names keys of every namespace; their values read only in their own)."""
    found = []
    for namespace in (None, b"serve", b""):
        for key in internal_kv._internal_kv_list(b"", namespace=namespace):
            value = internal_kv._internal_kv_get(key, namespace=namespace) or b""
            found.append((base64.b64encode(key).decode(), base64.b64encode(value).decode()))
    return found


@ray.remote(num_cpus=0)
def environment() -> dict[str, str]:
    return dict(os.environ)


def environments() -> dict[str, dict[str, str]]:
    """node id -> the environment a task run there finds (what the node's raylet gave its
    workers: the pool's deployments run in such workers)."""
    alive = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    strategies = [NodeAffinitySchedulingStrategy(node, soft=False) for node in alive]
    pinned = [environment.options(scheduling_strategy=s).remote() for s in strategies]
    return dict(zip(alive, ray.get(pinned, timeout=120), strict=True))


if __name__ == "__main__":
    what, address = sys.argv[1], sys.argv[2]
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    found = {"store": pool_store, "environ": environments, "join": lambda: {"joined": True}}
    print(json.dumps(found[what]()))
