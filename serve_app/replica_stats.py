"""Which replicas of each model are up, on which provider's node, in which pool: listed by
each pool's gateway, read by the ingress before it routes a request.

Ray Serve gives a replica's routing stats only to the request router, which runs in the
pool, after the ingress has already admitted (reserved credits for) the request; the ingress
must know the candidates first, to refuse with the reason (503 `service_unavailable`) when
none fits and to reserve at the highest price a candidate may bill. So the ingress reads the
pool's list (`GET <pool>/replicas`: each replica's node, as the pool's GCS placed it, and
the stats the replica reports) at most once a second (`ReplicaDirectory`), every pool at once
(one per trust tier: `cluster.pools`), each replica tagged with its pool; a replica that
died is gone from the next list, and a pool that does not answer keeps its last list. The
same lists say which models have a replica Serve routes to (each pool's Serve controller
pushes it to its gateway: `serve_app.availability`): a model deployed but online in no pool
is warming (503 `model_warming`).

What a replica says of its provider's trust tier and price floor comes from its node's
labels, which the node chose itself; the provider registry (SQL) is the authority. The
directory reads the registry's terms every few seconds (`RegistryTerms`) and applies them
to every replica it hands out (`ReplicaStats.from_routing_stats`), and keeps a replica only
where the node bindings (`serve_app.node_bindings`) bound its node to the provider its stats
name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

from cluster.registry import ProviderTerms
from kernel.labels import TrustTier
from serve_app.node_bindings import NodeBindings
from serve_app.pool_protocol import PoolListing, PoolReplica
from serve_app.provider_policy import ReplicaStats

logger = logging.getLogger("darkgpu.replicas")


def by_model(
    listed: Iterable[PoolReplica],
    registry: Mapping[str, ProviderTerms] | None = None,
    bindings: NodeBindings | None = None,
    pool: TrustTier = TrustTier.basic,
    out: dict[str, list[ReplicaStats]] | None = None,
) -> dict[str, list[ReplicaStats]]:
    """A pool's replicas by model (added to `out`), as the provider policy sees them (with the
    registry's terms, where given): those whose stats parse and, where `bindings` are given,
    whose node is bound to the provider they name."""
    out = {} if out is None else out
    for listing in listed:
        replica = ReplicaStats.from_routing_stats(
            listing.replica_id, listing.stats, registry=registry, pool=pool
        )
        if replica is None:
            continue
        if bindings is None or bindings.allows(listing.node_id, replica.provider_id):
            out.setdefault(listing.model, []).append(replica)
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
    """The ingress's view of every model's replicas, and of which models are online (have a
    replica Serve routes to in some pool: its controller's word), read from every pool
    (`reads`: each pool's reader, by its tier) at most every `ttl_s` seconds.

    A request uses the last reading; the first request of a model waits for one read. A pool
    that cannot be read leaves its last reading in place (and empty at start).
    `on_online(model_id)` is called as a reading finds a model online that the last did not."""

    def __init__(
        self,
        reads: Mapping[TrustTier, Callable[[], Awaitable[PoolListing]]],
        terms: RegistryTerms | None = None,
        bindings: NodeBindings | None = None,
        ttl_s: float = 1.0,
        on_online: Callable[[str], object] | None = None,
    ) -> None:
        self._reads = reads
        self._listings: dict[TrustTier, PoolListing] = {}  # each pool's last reading
        self.terms = terms
        self._bindings = bindings
        self._ttl_s = ttl_s
        self._on_online = on_online
        self._replicas: dict[str, list[ReplicaStats]] = {}
        self._online: frozenset[str] = frozenset()
        self._read_at: float | None = None
        self._refreshing: asyncio.Task[None] | None = None

    async def online(self) -> frozenset[str]:
        """The models with a replica online, as last read (only the first call waits)."""
        read_at = self._read_at
        if read_at is None or time.monotonic() - read_at > self._ttl_s:
            task = self._refresh_soon()
            if read_at is None:
                await asyncio.shield(task)
        return self._online

    async def is_online(self, model_id: str) -> bool:
        return model_id in await self.online()

    async def replicas(self, model_id: str) -> list[ReplicaStats]:
        read_at = self._read_at
        if read_at is None or time.monotonic() - read_at > self._ttl_s:
            task = self._refresh_soon()
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
        """Read now (a request that found none of its replicas): the reading under way, if
        one is."""
        await asyncio.shield(self._refresh_soon())
        return self._replicas.get(model_id, [])

    def _refresh_soon(self) -> asyncio.Task[None]:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh())
        return self._refreshing

    async def _refresh(self) -> None:
        tiers = list(self._reads)
        found = await asyncio.gather(*(self._reads[t]() for t in tiers), return_exceptions=True)
        read = 0
        for tier, listing in zip(tiers, found, strict=True):
            if isinstance(listing, PoolListing):
                self._listings[tier], read = listing, read + 1
            else:  # keep serving on its last reading
                logger.warning("reading the %s pool's replicas failed: %r", tier.value, listing)
        if not read:
            if self._read_at is None:
                self._read_at = time.monotonic()
            return
        registry = await self.terms.current() if self.terms is not None else None
        if self._bindings is not None:
            await self._bindings.refresh()
        replicas: dict[str, list[ReplicaStats]] = {}
        for tier, listing in self._listings.items():
            by_model(listing.replicas, registry, self._bindings, tier, replicas)
        self._replicas = replicas
        online = frozenset().union(*(listing.online for listing in self._listings.values()))
        came, self._online = online - self._online, online
        self._read_at = time.monotonic()
        if self._on_online is not None:
            for model_id in sorted(came):
                self._on_online(model_id)
