"""Which replicas of each model are up, on which provider's node: published by the replicas
into Redis, read by the ingress before it routes a request.

Ray Serve gives a replica's routing stats only to the request router, which runs after the
ingress has already admitted (reserved credits for) the request; the ingress must know the
candidates first, to refuse with the reason (503 `service_unavailable`) when none fits and
to reserve at the highest price a candidate may bill. So every model replica, from
`record_routing_stats` (Serve polls it every second), also writes its stats into the hash
`dg:replicas:<model id>` of the state Redis (`Settings.state_redis_url`: replicas run on
providers' nodes and are never handed the money Redis's URL; field: replica id; value: JSON
with an expiry a few seconds ahead). The ingress reads the hash at most once a second
(`ReplicaDirectory`) and ignores expired entries, so a replica that died drops out within
seconds; the hash itself expires when no replica refreshes it.

What a replica says of its provider's trust tier and price floor comes from its node's
labels, which the node chose itself; the provider registry (SQL) is the authority. The
directory reads the registry's terms every few seconds (`RegistryTerms`) and applies them
to every replica it hands out (`ReplicaStats.from_routing_stats`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from cluster.registry import ProviderTerms
from serve_app import node_bindings
from serve_app.provider_policy import ReplicaStats

STATS_TTL_S = 4.0
logger = logging.getLogger("darkgpu.replicas")


def replicas_key(model_id: str) -> str:
    return f"dg:replicas:{model_id}"


async def publish(redis: Any, model_id: str, replica_id: str, stats: Mapping[str, Any]) -> None:
    """One replica's stats, valid for `STATS_TTL_S` (an asyncio Redis client)."""
    now_ms = int(time.time() * 1000)
    value = json.dumps({**stats, "expires_ms": now_ms + int(STATS_TTL_S * 1000)})
    key = replicas_key(model_id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hset(key, replica_id, value)
        pipe.pexpire(key, int(STATS_TTL_S * 3000))
        await pipe.execute()


def parse(
    entries: Mapping[Any, Any],
    now_ms: int,
    registry: Mapping[str, ProviderTerms] | None = None,
) -> list[ReplicaStats]:
    """The unexpired replicas of one hash, as the provider policy sees them (with the
    registry's terms, where given)."""
    out = []
    for field, raw in entries.items():
        replica_id = field.decode() if isinstance(field, bytes) else str(field)
        try:
            stats = json.loads(raw)
        except (TypeError, ValueError):
            continue
        if not isinstance(stats, dict) or int(stats.get("expires_ms", 0)) < now_ms:
            continue
        replica = ReplicaStats.from_routing_stats(replica_id, stats, registry=registry)
        if replica is not None:
            out.append(replica)
    return out


class RegistryTerms:
    """The provider registry's terms, read (in a thread: `read` is blocking SQL) at most
    every `ttl_s` seconds. A failed read keeps the last terms; until the first read
    succeeds every provider counts as unknown (`basic`)."""

    def __init__(self, read: Callable[[], dict[str, ProviderTerms]], ttl_s: float = 5.0) -> None:
        self._read = read
        self._ttl_s = ttl_s
        self._terms: dict[str, ProviderTerms] = {}
        self._read_at: float | None = None
        self._lock = asyncio.Lock()

    async def current(self) -> dict[str, ProviderTerms]:
        if self._read_at is not None and time.monotonic() - self._read_at < self._ttl_s:
            return self._terms
        async with self._lock:
            if self._read_at is None or time.monotonic() - self._read_at >= self._ttl_s:
                try:
                    self._terms = await asyncio.to_thread(self._read)
                except Exception as exc:  # noqa: BLE001 - keep routing on the last terms
                    logger.warning("reading provider terms failed: %r", exc)
                self._read_at = time.monotonic()
        return self._terms

    def price_floor_pct(self, provider_id: str, reported: int) -> int:
        """The floor to bill a provider at: the registry's, else what its replica said."""
        terms = self._terms.get(provider_id)
        return terms.price_floor_pct if terms is not None else max(0, reported)


class ReplicaDirectory:
    """The ingress's view of every model's replicas, read at most every `ttl_s` seconds.

    A request uses the last reading; the first request of a model waits for one read.
    Redis being unreachable leaves the last reading in place (and empty at start)."""

    def __init__(self, redis: Any, terms: RegistryTerms | None = None, ttl_s: float = 1.0) -> None:
        self._redis = redis  # asyncio client
        self.terms = terms
        self._ttl_s = ttl_s
        self._replicas: dict[str, list[ReplicaStats]] = {}
        self._read_at: dict[str, float] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}

    async def replicas(self, model_id: str) -> list[ReplicaStats]:
        read_at = self._read_at.get(model_id)
        if read_at is None or time.monotonic() - read_at > self._ttl_s:
            task = self._refreshing.get(model_id)
            if task is None or task.done():
                task = asyncio.create_task(self._refresh(model_id))
                self._refreshing[model_id] = task
            if read_at is None or not self._replicas.get(model_id):
                await asyncio.shield(task)
        return self._replicas.get(model_id, [])

    async def registry(self) -> Mapping[str, ProviderTerms]:
        """The registry's terms by provider id (empty without a registry)."""
        return await self.terms.current() if self.terms is not None else {}

    def price_floor_pct(self, provider_id: str, reported: int) -> int:
        """The floor to bill a provider at: the registry's, else what its replica said."""
        if self.terms is None:
            return max(0, reported)
        return self.terms.price_floor_pct(provider_id, reported)

    async def refresh(self, model_id: str) -> list[ReplicaStats]:
        """Read now (a request that found none of its replicas)."""
        await self._refresh(model_id)
        return self._replicas.get(model_id, [])

    async def _refresh(self, model_id: str) -> None:
        try:
            entries = await self._redis.hgetall(replicas_key(model_id))
        except Exception as exc:  # noqa: BLE001 - keep serving on the last reading
            logger.warning("reading replica stats failed: %r", exc)
            self._read_at.setdefault(model_id, time.monotonic())
            return
        registry = await self.terms.current() if self.terms is not None else None
        await node_bindings.refresh_installed()
        self._replicas[model_id] = [
            replica
            for replica in parse(entries, int(time.time() * 1000), registry)
            if node_bindings.permits(replica.replica_id, replica.provider_id)
        ]  # a replica serves only as the provider its node is bound to (cluster.nodes)
        self._read_at[model_id] = time.monotonic()
