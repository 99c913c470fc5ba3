"""Replica choice: a Ray Serve custom `RequestRouter` on every model deployment.

It runs inside the caller's handle (the ingress), so choosing costs no extra actor hop on
the token stream. Each replica reports, through routing stats, its provider id, trust tier
and load (`ProviderLLMServer.record_routing_stats`); the router keeps the replicas that may
take the request and ranks them, least loaded first. Serve then sends the request to the
first replica of the best rank whose queue has room (probing queue lengths where its cache
has none), and backs off and retries when every queue is full.

Requests the ingress restricted (a trust tier, a price: `serve_app.provider_policy`) carry
what may serve them in their `RawRequestInfo` headers: the tier (`x-darkgpu-tier`), the
catalog price and the most per token the reservation covers (`x-darkgpu-price`:
"catalog_in,catalog_out,max_in,max_out" in nano-dollars), and the replicas the ingress saw
fit (`x-darkgpu-replicas`). The router applies the same policy to the live replicas' routing
stats, so a replica that started since the ingress looked (a drained node's replacement)
is a candidate too, and one that is draining is not; a listed replica whose stats have not
reached the router yet is kept. Should none fit any more, Serve waits for candidates and the
ingress's routing timeout answers 503.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from cluster.labels import TrustTier
from serve_app.provider_policy import Price, ReplicaStats, provider_price, tier_satisfies

REPLICAS_HEADER = "x-darkgpu-replicas"
TIER_HEADER = "x-darkgpu-tier"
PRICE_HEADER = "x-darkgpu-price"


class ReplicaView(Protocol):
    @property
    def routing_stats(self) -> Mapping[str, Any]: ...


def accepts(stats: Mapping[str, Any], required_tier: str | None = None) -> bool:
    """Whether a replica may take a request: it has reported who it is, and its tier fits."""
    if "provider_id" not in stats:
        return False  # not yet reported; Serve falls back to it only if nothing else is up
    return required_tier is None or stats.get("trust_tier") == required_tier


def rank(
    replicas: Sequence[ReplicaView],
    load_of: Callable[[ReplicaView], float],
    required_tier: str | None = None,
) -> list[list[ReplicaView]]:
    """Ranks of replicas, best first: accepting replicas by ascending load, then the rest.

    Replicas that have not reported routing stats yet (just started) come last, so a request
    still finds a replica while the stats catch up.
    """
    accepting = [r for r in replicas if accepts(r.routing_stats, required_tier)]
    unknown = [r for r in replicas if "provider_id" not in r.routing_stats]
    ranks = [sorted(accepting, key=load_of)] if accepting else []
    if unknown:
        ranks.append(unknown)
    return ranks


@dataclass(frozen=True)
class Allowed:
    """What may serve a restricted request (from the ingress's headers)."""

    replica_ids: tuple[str, ...]  # the ingress's pick, best first
    tier: TrustTier | None
    catalog: Price
    limit: Price  # the reserved price per token: no candidate may bill more

    def headers(self) -> dict[str, str]:
        prices = (self.catalog, self.limit)
        out = {
            REPLICAS_HEADER: ",".join(self.replica_ids),
            PRICE_HEADER: ",".join(
                str(n) for p in prices for n in (p.input_nusd_per_token, p.output_nusd_per_token)
            ),
        }
        if self.tier is not None:
            out[TIER_HEADER] = self.tier.value
        return out

    def fits(self, replica_id: str, stats: Mapping[str, Any]) -> bool:
        replica = ReplicaStats.from_routing_stats(replica_id, stats)
        if replica is None:  # no stats here yet: trust the ingress's reading
            return replica_id in self.replica_ids
        return (
            not replica.draining
            and tier_satisfies(replica.trust_tier, self.tier)
            and provider_price(self.catalog, replica.price_floor_pct).within(self.limit)
        )


def allowed(pending_request: PendingRequest | None) -> Allowed | None:
    """What the ingress allowed; None: unrestricted (or headers this router cannot read)."""
    if pending_request is None:
        return None
    info = pending_request.kwargs.get("raw_request_info")
    if info is None and len(pending_request.args) > 1:
        info = pending_request.args[1]
    headers = getattr(info, "headers", None) or {}
    if REPLICAS_HEADER not in headers:
        return None
    try:
        cin, cout, lin, lout = (int(n) for n in headers[PRICE_HEADER].split(","))
        tier = TrustTier(headers[TIER_HEADER]) if TIER_HEADER in headers else None
    except (KeyError, ValueError):
        return None
    replicas = tuple(r for r in headers[REPLICAS_HEADER].split(",") if r)
    return Allowed(replicas, tier, Price(cin, cout), Price(lin, lout))


def restrict(replicas: Sequence[Any], allow: Allowed, id_of: Callable[[Any], str]) -> list[Any]:
    """The replicas that fit, in the ingress's order (then the ones it did not see)."""
    order = {rid: i for i, rid in enumerate(allow.replica_ids)}
    kept = [r for r in replicas if allow.fits(id_of(r), r.routing_stats)]
    return sorted(kept, key=lambda r: order.get(id_of(r), len(order)))


class ProviderRequestRouter(RequestRouter):
    """No `FIFOMixin`: with it Serve hands a replica chosen for one request to the oldest
    pending request, which may be one this replica must not serve (another tier or price).
    Without it each chosen replica goes to the request it was chosen for."""

    def _load(self, replica: RunningReplica) -> float:
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        if queue_len is None:
            queue_len = replica.routing_stats.get("ongoing", 0)
        return queue_len / max(replica.max_ongoing_requests, 1)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        allow = allowed(pending_request)
        if allow is None:
            return rank(candidate_replicas, self._load)  # type: ignore[arg-type,return-value]
        if pending_request is not None and pending_request.future.done():
            # cancelled by the ingress (it routes again): Serve's routing loop checks that
            # only once it is offered a replica, and nothing is sent for a done request
            return [candidate_replicas]
        kept = restrict(candidate_replicas, allow, id_of=lambda r: r.replica_id.unique_id)
        # least loaded first; among equals, the ingress's order (healthy, load, cheapest)
        return [sorted(kept, key=self._load)] if kept else []
