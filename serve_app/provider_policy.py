"""Which providers' replicas may serve a request, best first: pure functions, no Ray.

The router (serve_app/router.py) turns each replica's routing stats into a `ReplicaStats`
and the request's `"provider"` object into `Requirements`, then calls `rank`:

- Trust tier: a request may require a tier (`"provider": {"trust_tier": "verified"}`) or
  inherit its account's default. Tiers are ordered, `basic` < `verified`: a replica
  satisfies a requirement at or below its own tier (`verified` hardware also serves
  requests that ask only for `basic`).
- Price: a provider's price is the catalog price × (1 + price_floor_pct / 100), per input
  and per output token, in whole nano-dollars rounded up (the provider never gets less than
  its floor). A request goes only to providers at or below the catalog price, unless it
  allows more with `"provider": {"max_price": {"prompt": usd_per_1m, "completion": …}}`
  (OpenRouter's shape; a side it leaves out stays at the catalog price). The request is
  billed at the price of the provider that served it; the reservation uses `Ranked.highest`.
- Usage strikes (billing.strikes: the provider's engine reported more completion tokens
  than the ingress delivered, beyond the tolerance) within the registry's window: a provider
  with `DEMOTE_STRIKES` or more ranks after every provider without (it serves only when they
  are full or gone), one with `EXCLUDE_STRIKES` or more serves no request at all.
- Among the candidates: not draining first (a draining replica is used only while nothing
  else fits: Serve keeps it until its replacement runs, and a request must not fail in
  between), then without strikes, then healthy, then least loaded, then cheapest, then by
  replica id.
- No candidate: the reason, checked in this order: no provider online (no replica), none
  at this tier, none at this price. `no_candidate_error` makes the spec's 503
  `service_unavailable` of it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from kernel.errors import InvalidRequest, Unavailable
from kernel.labels import LOCAL_PROVIDER_ID, TrustTier
from kernel.money import NUSD_PER_TOKEN_AT_1_USD_PER_1M

if TYPE_CHECKING:
    from cluster.registry import ProviderTerms

logger = logging.getLogger(__name__)
TIER_ORDER = {TrustTier.basic: 0, TrustTier.verified: 1}
# Usage strikes within the registry's window (cluster.registry.STRIKE_WINDOW) that demote a
# provider's replicas behind every other, and that take it out of routing altogether. One
# strike already lies beyond the honest tolerance; ten leave no doubt.
DEMOTE_STRIKES = 1
EXCLUDE_STRIKES = 10


class NoProviderReason(StrEnum):
    no_provider_online = "no_provider_online"
    none_at_tier = "none_at_tier"
    none_at_price = "none_at_price"


@dataclass(frozen=True, order=True)
class Price:
    """Nano-dollars per token."""

    input_nusd_per_token: int
    output_nusd_per_token: int

    def within(self, limit: Price) -> bool:
        return (
            self.input_nusd_per_token <= limit.input_nusd_per_token
            and self.output_nusd_per_token <= limit.output_nusd_per_token
        )


def provider_price(catalog: Price, price_floor_pct: int) -> Price:
    """catalog × (1 + pct / 100), each side rounded up to a whole nano-dollar."""
    if price_floor_pct < 0:
        raise ValueError("price_floor_pct must be >= 0")

    def up(nusd: int) -> int:
        return -(-nusd * (100 + price_floor_pct) // 100)

    return Price(up(catalog.input_nusd_per_token), up(catalog.output_nusd_per_token))


@dataclass(frozen=True)
class ReplicaStats:
    replica_id: str
    provider_id: str
    trust_tier: TrustTier
    price_floor_pct: int = 0
    healthy: bool = True
    draining: bool = False
    load: float = 0.0  # e.g. ongoing requests / max ongoing requests
    approved: bool = True  # False: the registry does not let its provider serve at all
    strikes: int = 0  # its provider's recent usage strikes (from the registry)
    pool: TrustTier = TrustTier.basic  # the supply pool it runs in (where it is sent)

    @property
    def demoted(self) -> bool:
        """Its provider's recent strikes rank it after every replica without."""
        return self.strikes >= DEMOTE_STRIKES

    @property
    def excluded(self) -> bool:
        """Its provider's recent strikes keep it out of routing."""
        return self.strikes >= EXCLUDE_STRIKES

    @classmethod
    def from_routing_stats(
        cls,
        replica_id: str,
        stats: Mapping[str, Any],
        load: float | None = None,
        registry: Mapping[str, ProviderTerms] | None = None,
        pool: TrustTier = TrustTier.basic,
    ) -> ReplicaStats | None:
        """From `record_routing_stats()`'s dict; None until the replica has reported who it
        is. Keys: provider_id, trust_tier, price_floor_pct, healthy, draining, ongoing.

        A node's labels are self-declared (Ray trusts every node that has the cluster
        token), so where `registry` is given (the provider registry's terms by provider id)
        its tier, price floor, status and review win over what the replica reports: a
        provider the operator has not approved is not `approved`, nor is one it does not
        know (a made-up id), except the platform's own head (`local`, basic). A replica's own
        word that its node is draining always counts.

        Its tier is never above its `pool`'s: every node of a pool can run code on every
        other, so a replica in the basic pool is basic whatever its provider is. Nor does a
        provider the registry places in another tier serve from this pool (its tier changed
        since it joined: the warden drains its node, and its agent joins its tier's pool).
        """
        if "provider_id" not in stats:
            return None
        try:
            provider_id, floor, ongoing = _claims(stats, load)
        except (TypeError, ValueError, OverflowError) as exc:
            # a replica runs on its provider's machine: what it reports is input, and one
            # bad entry must cost that replica its traffic, not the model its routing
            logger.warning("replica %s: ignoring malformed routing stats (%s)", replica_id, exc)
            return None
        tier = stats.get("trust_tier")
        trust = TrustTier(tier) if isinstance(tier, str) and tier in TIER_ORDER else TrustTier.basic
        draining = stats.get("draining", False) is not False
        approved = True
        strikes = 0
        if registry is not None:
            terms = registry.get(provider_id)
            if terms is None:
                trust = TrustTier.basic
                approved = provider_id == LOCAL_PROVIDER_ID
            else:
                trust, floor = terms.trust_tier, terms.price_floor_pct
                draining = draining or not terms.takes_requests
                approved = terms.approved and terms.trust_tier == pool
                strikes = terms.recent_strikes
        if TIER_ORDER[trust] > TIER_ORDER[pool]:
            trust = pool
        return cls(
            replica_id=replica_id,
            provider_id=provider_id,
            trust_tier=trust,
            price_floor_pct=floor,
            healthy=stats.get("healthy", True) is True,
            draining=draining,
            load=ongoing,
            approved=approved,
            strikes=strikes,
            pool=pool,
        )


def _claims(stats: Mapping[str, Any], load: float | None) -> tuple[str, int, float]:
    """The provider id, price floor and load a replica reports, checked (ValueError or
    TypeError when malformed)."""
    provider_id = stats["provider_id"]
    if not isinstance(provider_id, str) or not 0 < len(provider_id) <= 64:
        raise ValueError(f"provider_id {provider_id!r:.80}")
    floor = stats.get("price_floor_pct") or 0
    if isinstance(floor, bool) or not isinstance(floor, int) or not 0 <= floor <= 1000:
        raise ValueError(f"price_floor_pct {floor!r:.80}")
    ongoing = stats.get("ongoing", 0) if load is None else load
    if isinstance(ongoing, bool) or not isinstance(ongoing, int | float):
        raise TypeError(f"ongoing {ongoing!r:.80}")
    if not math.isfinite(ongoing) or ongoing < 0:
        raise ValueError(f"ongoing {ongoing!r:.80}")
    return provider_id, floor, float(ongoing)


@dataclass(frozen=True)
class Requirements:
    trust_tier: TrustTier | None = None  # None: any tier
    max_price: Price | None = None  # None: the catalog price


@dataclass(frozen=True)
class Candidate:
    replica: ReplicaStats
    price: Price


@dataclass(frozen=True)
class Ranked:
    candidates: tuple[Candidate, ...]  # never empty, best first

    @property
    def highest(self) -> Price:
        """The highest price any candidate would bill: what the reservation must cover."""
        return Price(
            max(c.price.input_nusd_per_token for c in self.candidates),
            max(c.price.output_nusd_per_token for c in self.candidates),
        )

    @property
    def replica_ids(self) -> list[str]:
        return [c.replica.replica_id for c in self.candidates]

    @property
    def pool(self) -> TrustTier:
        """Where the request goes: the pool of the best candidate."""
        return self.candidates[0].replica.pool

    def in_pool(self) -> Ranked:
        """The candidates in the best one's pool (the only ones its router can reach)."""
        return Ranked(tuple(c for c in self.candidates if c.replica.pool == self.pool))


@dataclass(frozen=True)
class NoCandidate:
    reason: NoProviderReason
    message: str


def tier_satisfies(offered: TrustTier, required: TrustTier | None) -> bool:
    return required is None or TIER_ORDER[offered] >= TIER_ORDER[required]


def price_limit(catalog: Price, requirements: Requirements) -> Price:
    """The most a request allows per token: its max_price, or the catalog price."""
    return requirements.max_price or catalog


def rank(
    replicas: Iterable[ReplicaStats],
    requirements: Requirements,
    catalog: Price,
    model_id: str = "",
) -> Ranked | NoCandidate:
    """The replicas that may serve the request, best first, or why there are none."""
    online = [r for r in replicas if r.approved and not r.excluded]
    named = f" for the model '{model_id}'" if model_id else ""
    if not online:
        return NoCandidate(
            NoProviderReason.no_provider_online,
            f"No provider is online{named} right now; retry shortly.",
        )
    at_tier = [r for r in online if tier_satisfies(r.trust_tier, requirements.trust_tier)]
    if not at_tier:
        tier = requirements.trust_tier.value if requirements.trust_tier else "any"
        return NoCandidate(
            NoProviderReason.none_at_tier,
            f"No provider at trust tier '{tier}' is online{named} right now.",
        )
    limit = price_limit(catalog, requirements)
    priced = [Candidate(r, provider_price(catalog, r.price_floor_pct)) for r in at_tier]
    affordable = [c for c in priced if c.price.within(limit)]
    if not affordable:
        cheapest = min(c.replica.price_floor_pct for c in priced)
        return NoCandidate(
            NoProviderReason.none_at_price,
            f"No provider{named} is online at or below the price this request allows "
            f"(the cheapest asks {cheapest}% above the catalog price); allow more with "
            "provider.max_price.",
        )
    return Ranked(tuple(sorted(affordable, key=_order)))


def _order(c: Candidate) -> tuple[bool, bool, bool, float, int, str]:
    """Best first: not draining, not demoted, healthy, least loaded, cheapest."""
    r = c.replica
    return (r.draining, r.demoted, not r.healthy, r.load, r.price_floor_pct, r.replica_id)


def by_load(ranked: Ranked, load: Callable[[str], float]) -> Ranked:
    """The candidates in `rank`'s order again, each replica's load the most of what it had
    and `load(replica_id)` (what the ingress has in flight there now)."""
    now = [
        Candidate(replace(c.replica, load=max(c.replica.load, load(c.replica.replica_id))),
                  c.price)
        for c in ranked.candidates
    ]  # fmt: skip
    return Ranked(tuple(sorted(now, key=_order)))


def no_candidate_error(none: NoCandidate, retry_after_s: int = 5) -> Unavailable:
    """The spec's 503 `service_unavailable`, its `code` naming the reason."""
    return Unavailable(
        none.message,
        code=none.reason.value,
        headers={"Retry-After": str(retry_after_s)},
    )


# --- the request's "provider" object ---------------------------------------------------------


def _usd_per_1m_to_nusd(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidRequest(f"{param} must be a number of USD per 1M tokens.", param=param)
    try:
        amount = Decimal(repr(value) if isinstance(value, float) else str(value))
    except InvalidOperation:
        raise InvalidRequest(f"{param} must be a number.", param=param) from None
    if not amount.is_finite() or amount < 0:
        raise InvalidRequest(f"{param} must be a non-negative number.", param=param)
    return int(amount * NUSD_PER_TOKEN_AT_1_USD_PER_1M)  # whole nano-dollars, rounded down


def parse_requirements(
    provider: Any, catalog: Price, default_tier: TrustTier | None = None
) -> Requirements:
    """`Requirements` from a request body's `"provider"` object (None when absent).

    `{"trust_tier": "basic" | "verified", "max_price": {"prompt": usd_per_1m,
    "completion": usd_per_1m}}`; other OpenRouter keys are ignored. Raises InvalidRequest.
    """
    if provider is None:
        return Requirements(trust_tier=default_tier)
    if not isinstance(provider, Mapping):
        raise InvalidRequest("provider must be an object.", param="provider")
    tier = default_tier
    raw_tier = provider.get("trust_tier")
    if raw_tier is not None:
        if raw_tier not in TIER_ORDER:
            raise InvalidRequest(
                "provider.trust_tier must be 'basic' or 'verified'.", param="provider.trust_tier"
            )
        tier = TrustTier(raw_tier)
    max_price = None
    raw_price = provider.get("max_price")
    if raw_price is not None:
        if not isinstance(raw_price, Mapping):
            raise InvalidRequest(
                "provider.max_price must be an object: {prompt, completion} in USD per 1M tokens.",
                param="provider.max_price",
            )
        prompt = raw_price.get("prompt")
        completion = raw_price.get("completion")
        max_price = Price(
            catalog.input_nusd_per_token
            if prompt is None
            else _usd_per_1m_to_nusd(prompt, "provider.max_price.prompt"),
            catalog.output_nusd_per_token
            if completion is None
            else _usd_per_1m_to_nusd(completion, "provider.max_price.completion"),
        )
    return Requirements(trust_tier=tier, max_price=max_price)
