"""Replica choice: a Ray Serve custom `RequestRouter` on every model deployment.

It runs inside the caller's handle (the ingress), so choosing costs no extra actor hop on
the token stream. Each replica reports, through routing stats, its provider id, trust tier
and load (`ProviderLLMServer.record_routing_stats`); the router keeps the replicas that may
take the request and ranks them, least loaded first. Serve then sends the request to the
first replica of the best rank whose queue has room (probing queue lengths where its cache
has none), and backs off and retries when every queue is full.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


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


class ProviderRequestRouter(FIFOMixin, RequestRouter):
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
        return rank(candidate_replicas, self._load)  # type: ignore[arg-type,return-value]
