"""The pool's model replicas, as its gateway lists them to the control plane (`GET
<pool>/replicas`, `serve_app.pool_protocol`).

Where each replica runs comes from the pool's GCS (its actor table: the node it placed the
replica's actor on), never from the replica. What each replica reports of itself
(`ProviderLLMServer.record_routing_stats`: its provider, load, whether its node drains) the
gateway asks the replica's actor for, as Serve's controller does, and hands on as it came:
the ingress parses it as untrusted and takes tier and price from the registry.

Read at most every `ttl_s` seconds, every replica asked at once and given `STATS_TIMEOUT_S`:
one still loading its model, or one that never answers, is left out until it answers. A
replica is listed from the moment its stats answer, before Serve's own polling brings them to
the request router, so a drained node's replacement is routable at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import ray

from cluster.ray_internals import SERVE_NAMESPACE, SERVE_REPLICA_ACTOR_PREFIX, alive_actor_nodes
from serve_app.models import MODEL_APP_PREFIX
from serve_app.pool_protocol import PoolReplica

STATS_TIMEOUT_S = 0.5
logger = logging.getLogger("darkgpu.pool")


class PoolReplicas:
    def __init__(
        self,
        apps: Mapping[str, str],
        ttl_s: float = 1.0,
        placements: Callable[[str], Mapping[str, str]] = alive_actor_nodes,
    ) -> None:
        self._apps = apps  # each model's Serve application name -> its catalog id
        self._ttl_s = ttl_s
        self._placements = placements
        self._actors: dict[str, Any] = {}  # actor name -> its handle
        self._listed: list[PoolReplica] = []
        self._read_at: float | None = None
        self._lock = asyncio.Lock()

    async def current(self) -> list[PoolReplica]:
        if self._fresh():
            return self._listed
        async with self._lock:  # one reading at a time; those who waited share it
            if not self._fresh():
                self._listed = await self._read()
                self._read_at = time.monotonic()
        return self._listed

    def _fresh(self) -> bool:
        return self._read_at is not None and time.monotonic() - self._read_at < self._ttl_s

    async def _read(self) -> list[PoolReplica]:
        placed = await asyncio.to_thread(
            self._placements, SERVE_REPLICA_ACTOR_PREFIX + MODEL_APP_PREFIX
        )
        found = []
        for name, node_id in placed.items():
            app, _, rest = name.removeprefix(SERVE_REPLICA_ACTOR_PREFIX).partition("#")
            if app in self._apps:
                found.append((name, self._apps[app], rest.rsplit("#", 1)[-1], node_id))
        self._actors = {name: a for name, a in self._actors.items() if name in placed}
        answers = await asyncio.gather(*(self._stats(name) for name, *_ in found))
        return [
            PoolReplica(model, replica_id, node_id, stats)
            for (_name, model, replica_id, node_id), stats in zip(found, answers, strict=True)
            if stats is not None
        ]

    async def _stats(self, name: str) -> dict[str, Any] | None:
        try:
            if name not in self._actors:
                self._actors[name] = await asyncio.to_thread(ray.get_actor, name, SERVE_NAMESPACE)
            actor = self._actors[name]
            stats = await asyncio.wait_for(actor.record_routing_stats.remote(), STATS_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - loading, gone, or not answering: not listed
            logger.debug("no stats from %s: %r", name, exc)
            return None
        return stats if isinstance(stats, dict) else None
