"""Metrics of the billing actor's process (the `billing-meter` deployment), exported by Ray
beside the ingress's (`ray_darkgpu_*`).

- Spend is counted here, when the meter commits a batch to the SQL ledger: the ledger is the
  truth, each request is counted once however often the stream replays it (replays are
  skipped), events the ledger refuses (dead letters) are not counted, and the usage event
  carries its model. Counting at the ingress's settlement would count what Redis settled,
  before the ledger took it.
- Gauges are read every few seconds by a thread of their own (a stuck ledger write must not
  freeze the gauge that shows it): the usage stream's backlog and the age of its oldest
  entry (how far the ledger is behind), providers by tier and status in the registry,
  providers serving by tier (those with a live replica in the replica directory, which is
  what the ingress routes to), and payouts by status (SQL, so payouts run by hand count too).

`ray.util.metrics` rather than `ray.serve.metrics`: these readings are about the platform,
not the replica, so a restarted billing replica continues the same series.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import redis.exceptions
from ray.util import metrics
from sqlalchemy import func, select

from cluster.registry import ProviderTerms, provider_terms
from core.schema import Payout, PayoutStatus, Provider, ProviderStatus
from kernel import redis_keys as rk
from kernel.labels import TrustTier
from serve_app.pool_protocol import PoolReplica
from serve_app.provider_policy import ReplicaStats

if TYPE_CHECKING:
    import redis as redis_sync
    from sqlalchemy import Engine

log = logging.getLogger(__name__)
TIERS = tuple(t.value for t in TrustTier)


class Backlog(NamedTuple):
    length: int  # usage events in the stream: settled, not yet in the ledger
    pending: int  # of those, delivered to a meter and not yet acknowledged
    dead: int  # events the meter could not record (the dead-letter stream)
    oldest_age_s: float  # age of the oldest event not yet in the ledger (0: none)


def read_backlog(r: redis_sync.Redis, now_ms: int | None = None) -> Backlog:
    """The usage stream's backlog. The meter deletes an entry once the ledger has it, so the
    oldest entry left is the oldest not yet flushed (its id is its append time, in ms)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    pipe = r.pipeline(transaction=False)
    pipe.xlen(rk.USAGE_STREAM)
    pipe.xlen(rk.DEAD_STREAM)
    pipe.xrange(rk.USAGE_STREAM, count=1)
    length, dead, first = pipe.execute()
    try:
        pending = int(r.xpending(rk.USAGE_STREAM, rk.METER_GROUP)["pending"])
    except redis.exceptions.ResponseError:  # NOGROUP: no meter has read the stream yet
        pending = 0
    oldest_age_s = 0.0
    if first:
        stream_id = first[0][0]
        appended_ms = int((stream_id.decode() if isinstance(stream_id, bytes) else stream_id)
                          .split("-")[0])  # fmt: skip
        oldest_age_s = max(0.0, (now_ms - appended_ms) / 1000)
    return Backlog(int(length), pending, int(dead), oldest_age_s)


def read_registered(engine: Engine) -> dict[tuple[str, str], int]:
    """Registered providers by (trust tier, status); every pair present, zeros included."""
    counts = {(tier, s.value): 0 for tier in TIERS for s in ProviderStatus}
    query = select(Provider.trust_tier, Provider.status, func.count()).group_by(
        Provider.trust_tier, Provider.status
    )
    with engine.connect() as conn:
        for tier, status, n in conn.execute(query):
            counts[(tier, status)] = int(n)
    return counts


def read_serving(
    listed: Mapping[TrustTier, Iterable[PoolReplica]],
    registry: Mapping[str, ProviderTerms] | None = None,
) -> dict[str, int]:
    """Providers with at least one healthy replica of any model that is not draining, by
    trust tier (each pool's replicas, `listed`): the registry's (`registry`, as the ingress
    routes by it), where given, never above the pool's."""
    providers: set[tuple[str, str]] = set()
    for pool, replicas in listed.items():
        for listing in replicas:
            replica = ReplicaStats.from_routing_stats(
                listing.replica_id, listing.stats, registry=registry, pool=pool
            )
            if replica is not None and replica.healthy and not replica.draining:
                providers.add((replica.trust_tier.value, replica.provider_id))
    serving = dict.fromkeys(TIERS, 0)
    serving.update(Counter(tier for tier, _provider in providers))
    return serving


def read_payouts(engine: Engine) -> dict[str, tuple[int, int]]:
    """Payouts by status: (how many, their total in cents); every status present."""
    totals = {s.value: (0, 0) for s in PayoutStatus}
    query = select(Payout.status, func.count(), func.coalesce(func.sum(Payout.amount_cents), 0))
    with engine.connect() as conn:
        for status, n, cents in conn.execute(query.group_by(Payout.status)):
            totals[status] = (int(n), int(cents))
    return totals


class MeterMetrics:
    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self._stop = threading.Event()
        self.spend = metrics.Counter(
            "darkgpu_spend_nusd",
            description="Nano-dollars billed (written to the ledger), by model.",
            tag_keys=("model",),
        )
        self.stream_length = metrics.Gauge(
            "darkgpu_usage_stream_length",
            description="Usage events settled but not yet written to the ledger.",
        )
        self.stream_pending = metrics.Gauge(
            "darkgpu_usage_stream_pending",
            description="Usage events delivered to the billing actor, not yet acknowledged.",
        )
        self.dead_letters = metrics.Gauge(
            "darkgpu_usage_dead_letters",
            description="Usage events the billing actor could not record (dg:usage:dead).",
        )
        self.flush_lag = metrics.Gauge(
            "darkgpu_ledger_flush_lag_seconds",
            description="Age of the oldest usage event not yet written to the ledger (0: none).",
        )
        self.providers = metrics.Gauge(
            "darkgpu_providers",
            description="Registered providers, by trust tier and status.",
            tag_keys=("tier", "status"),
        )
        self.serving = metrics.Gauge(
            "darkgpu_providers_serving",
            description="Providers with a live replica of some model, by trust tier.",
            tag_keys=("tier",),
        )
        self.payouts = metrics.Gauge(
            "darkgpu_payouts",
            description="Provider payouts, by status.",
            tag_keys=("status",),
        )
        self.payouts_cents = metrics.Gauge(
            "darkgpu_payouts_cents",
            description="Provider payouts' total amount in US cents, by status.",
            tag_keys=("status",),
        )

    def recorded(self, rows: Sequence[dict[str, Any]]) -> None:
        """`UsageMeter`'s `on_recorded`: the spend of a committed batch."""
        spend: Counter[str] = Counter()
        for row in rows:
            spend[row["model"]] += int(row["cost_nusd"])
        for model, nusd in spend.items():
            if nusd > 0:
                self.spend.inc(nusd, tags={"model": model})

    def refresh(
        self,
        engine: Engine,
        r: redis_sync.Redis,
        replicas: Callable[[], Mapping[TrustTier, list[PoolReplica]]],
    ) -> None:
        """Read every gauge; a source that fails leaves its gauges at their last reading.
        `r`: the money Redis (the usage stream); `replicas`: reads each pool's replicas
        (`serve_app.pool_admin.PoolAdmin.replicas`)."""
        self._read("usage stream", lambda: self._set_backlog(read_backlog(r)))
        self._read("provider registry", lambda: self._set_providers(read_registered(engine)))
        self._read(
            "the pool's replicas",
            lambda: self._set_serving(read_serving(replicas(), provider_terms(engine))),
        )
        self._read("payouts", lambda: self._set_payouts(read_payouts(engine)))

    def start(
        self,
        engine: Engine,
        r: redis_sync.Redis,
        replicas: Callable[[], Mapping[TrustTier, list[PoolReplica]]],
    ) -> threading.Thread:
        """Refresh the gauges every `every_s` seconds, in a daemon thread, until `stop`."""

        def run() -> None:
            while True:
                self.refresh(engine, r, replicas)
                if self._stop.wait(self.every_s):
                    return

        thread = threading.Thread(target=run, name="meter-metrics", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    @staticmethod
    def _read(source: str, read: Callable[[], None]) -> None:
        try:
            read()
        except Exception as exc:  # noqa: BLE001 - keep the other gauges fresh
            log.warning("reading %s for metrics failed: %r", source, exc)

    def _set_backlog(self, backlog: Backlog) -> None:
        self.stream_length.set(backlog.length)
        self.stream_pending.set(backlog.pending)
        self.dead_letters.set(backlog.dead)
        self.flush_lag.set(backlog.oldest_age_s)

    def _set_providers(self, counts: dict[tuple[str, str], int]) -> None:
        for (tier, status), n in counts.items():
            self.providers.set(n, tags={"tier": tier, "status": status})

    def _set_serving(self, serving: dict[str, int]) -> None:
        for tier, n in serving.items():
            self.serving.set(n, tags={"tier": tier})

    def _set_payouts(self, totals: dict[str, tuple[int, int]]) -> None:
        for status, (n, cents) in totals.items():
            self.payouts.set(n, tags={"status": status})
            self.payouts_cents.set(cents, tags={"status": status})
