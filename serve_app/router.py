"""Replica choice: a Ray Serve custom `RequestRouter` on every model deployment.

It runs inside the caller's handle (the pool's gateway, `serve_app.pool`, which the ingress
reaches over HTTP), so choosing costs no extra actor hop on the token stream. Each replica
reports, through routing stats, its provider id, trust tier, load and whether its node is
draining (`ProviderLLMServer.record_routing_stats`); the router keeps the replicas that may
take the request and ranks them, least loaded first. Serve then sends the request to the
first replica of the best rank whose queue has room (probing queue lengths where its cache
has none), and backs off and retries when every queue is full. A draining replica takes no
new request while any other can.

Every request the ingress sends carries what may serve it in headers (HTTP ones to the
gateway, which hands them on as the call's `RawRequestInfo`): the replicas the ingress saw fit,
best first (`x-darkgpu-replicas`): of the tier and price the request allows by the registry's
terms (`serve_app.provider_policy`), on a node bound to the provider their stats name. The
router keeps only the listed replicas, draining ones in a later rank: a replica's stats come
from its provider's machine and a node's labels are its own claim, so neither gets a replica
in. A replica the ingress has not seen yet (a drained node's replacement) takes requests once
its stats reach the ingress (within a second); should none of the listed fit any more, Serve
waits for candidates until the time the ingress gave a replica to take it runs out: the
gateway gives it back, and the ingress routes it again on a fresh reading. Providers with
recent usage strikes (billing.strikes) come in the headers too (`x-darkgpu-demoted`): their
replicas rank after every other that fits.

Load is not taken on a replica's word: it runs on its provider's machine, and one that reports
`ongoing: 0` would draw the traffic. The router counts the requests it has sent to each replica
and not yet seen complete (`InFlight`, from Serve's own `on_send_request` and
`on_request_completed` hooks) and weighs a replica by the most of that count, Serve's queue
length cache and what the replica reports. Each replica is offered as a rank of its own, in
that order, so Serve's choice within a rank (by its cache, which the replica's probe answers
refresh) cannot put a replica that under-reports ahead of a less loaded one.

Which replica is bound where is decided in the control plane, not here: the ingress lists
only replicas on nodes bound to the provider they name (`serve_app.replica_stats`,
`serve_app.node_bindings`, `cluster.nodes`), and the router runs in the pool's gateway, which
holds none of the control plane's state. A request that lists no replica (only the ingress
calls the pool, and it always lists) is taken by none.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

REPLICAS_HEADER = "x-darkgpu-replicas"
NOTHING_FITS_WAIT_S = 0.05
DEMOTED_HEADER = "x-darkgpu-demoted"
# what the ingress allowed, as the router reads it (`Allowed`); they travel to the pool too
ALLOWED_HEADERS = (REPLICAS_HEADER, DEMOTED_HEADER)


class ReplicaView(Protocol):
    @property
    def routing_stats(self) -> Mapping[str, Any]: ...


def reported_load(stats: Mapping[str, Any]) -> float:
    """The ongoing requests a replica reports; a value that is not a finite count (it comes
    from the provider's machine) counts as full, so it draws no traffic by lying."""
    ongoing = stats.get("ongoing", 0)
    if isinstance(ongoing, bool) or not isinstance(ongoing, int | float):
        return math.inf
    return float(ongoing) if math.isfinite(ongoing) and ongoing >= 0 else math.inf


class InFlight:
    """Requests this router sent to each replica and has not seen complete: the load the
    ingress knows of its own, whatever a replica reports."""

    def __init__(self) -> None:
        self._count: dict[Any, int] = {}

    def sent(self, replica_id: Any) -> None:
        self._count[replica_id] = self._count.get(replica_id, 0) + 1

    def completed(self, replica_id: Any) -> None:
        left = self._count.get(replica_id, 0) - 1
        if left > 0:
            self._count[replica_id] = left
        else:
            self._count.pop(replica_id, None)

    def __getitem__(self, replica_id: Any) -> int:
        return self._count.get(replica_id, 0)


def load(own: int, cached: int | None, stats: Mapping[str, Any]) -> float:
    """A replica's ongoing requests: the most of the router's own count, Serve's cache and
    the replica's report (reporting less than the truth gains nothing)."""
    return max(float(own), float(cached or 0), reported_load(stats))


def singletons(ranks: list[list[Any]]) -> list[list[Any]]:
    """Each replica a rank of its own, in order (see the module's docstring)."""
    return [[replica] for group in ranks for replica in group]


@dataclass(frozen=True)
class Allowed:
    """What may serve a request (from the ingress's headers): only the replicas it listed.
    A replica's own stats (its provider, tier, labels) never get it in: they come from the
    provider's machine, and in the pool no node bindings vouch for them."""

    replica_ids: tuple[str, ...]  # the ingress's pick, best first
    demoted: frozenset[str] = frozenset()  # providers with recent usage strikes: last

    def headers(self) -> dict[str, str]:
        return {
            REPLICAS_HEADER: ",".join(self.replica_ids),
            DEMOTED_HEADER: ",".join(sorted(self.demoted)),
        }

    def is_demoted(self, stats: Mapping[str, Any]) -> bool:
        return str(stats.get("provider_id", "")) in self.demoted

    def fits(self, replica_id: str) -> bool:
        return replica_id in self.replica_ids


def allowed(pending_request: PendingRequest | None) -> Allowed | None:
    """What the ingress allowed; None: nothing listed (or headers this router cannot read)."""
    if pending_request is None:
        return None
    info = pending_request.kwargs.get("raw_request_info")
    if info is None and len(pending_request.args) > 1:
        info = pending_request.args[1]
    headers = getattr(info, "headers", None) or {}
    if REPLICAS_HEADER not in headers:
        return None
    replicas = tuple(r for r in headers[REPLICAS_HEADER].split(",") if r)
    demoted = frozenset(p for p in headers.get(DEMOTED_HEADER, "").split(",") if p)
    return Allowed(replicas, demoted)


def restrict(replicas: Sequence[Any], allow: Allowed, id_of: Callable[[Any], str]) -> list[Any]:
    """The replicas the ingress listed, in its order."""
    order = {rid: i for i, rid in enumerate(allow.replica_ids)}
    return sorted((r for r in replicas if allow.fits(id_of(r))), key=lambda r: order[id_of(r)])


class ProviderRequestRouter(RequestRouter):
    """No `FIFOMixin`: with it Serve hands a replica chosen for one request to the oldest
    pending request, which may be one this replica must not serve (another tier or price).
    Without it each chosen replica goes to the request it was chosen for."""

    @property
    def in_flight(self) -> InFlight:
        """This router's own count of requests in flight per replica."""
        counts: InFlight | None = self.__dict__.get("_darkgpu_in_flight")
        if counts is None:
            counts = self.__dict__["_darkgpu_in_flight"] = InFlight()
        return counts

    def on_send_request(self, replica_id: Any) -> None:
        super().on_send_request(replica_id)
        self.in_flight.sent(replica_id)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self.in_flight.completed(replica_id)

    def _load(self, replica: RunningReplica) -> float:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        ongoing = load(self.in_flight[replica.replica_id], cached, replica.routing_stats)
        return ongoing / max(replica.max_ongoing_requests, 1)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        allow = allowed(pending_request)
        if allow is None or pending_request is None:
            # nothing listed, nothing allowed: wait a moment (Serve asks again at once, and a
            # router that answers at once spins, holding the GIL of the gateway's process)
            await asyncio.sleep(NOTHING_FITS_WAIT_S)
            return []
        if pending_request.future.done():
            # cancelled by the ingress (it routes again): Serve's routing loop checks that
            # only once it is offered a replica, and nothing is sent for a done request
            return [candidate_replicas]
        kept = restrict(candidate_replicas, allow, id_of=lambda r: r.replica_id.unique_id)
        if not kept:
            # nothing fits yet (a replica the ingress listed is not running here yet):
            # Serve asks again at once, so wait a moment rather than spin
            await asyncio.sleep(NOTHING_FITS_WAIT_S)
            return []
        # least loaded first; among equals, the ingress's order (healthy, load, cheapest);
        # providers with recent strikes only when the others are full, draining replicas last
        leaving = [r for r in kept if r.routing_stats.get("draining", False)]
        staying = [r for r in kept if not r.routing_stats.get("draining", False)]
        honest = [r for r in staying if not allow.is_demoted(r.routing_stats)]
        struck = [r for r in staying if allow.is_demoted(r.routing_stats)]
        groups = (honest, struck, leaving)
        return singletons([sorted(group, key=self._load) for group in groups if group])
