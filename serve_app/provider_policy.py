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
- Among the candidates: not draining first (a draining replica is used only while nothing
  else fits: Serve keeps it until its replacement runs, and a request must not fail in
  between), then healthy, then least loaded, then cheapest, then by replica id.
- No candidate: the reason, checked in this order: no provider online (no replica), none
  at this tier, none at this price. `no_candidate_error` makes the spec's 503
  `service_unavailable` of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from cluster.labels import TrustTier
from serve_app.errors import APIError, invalid_request

if TYPE_CHECKING:
    from cluster.registry import ProviderTerms

TIER_ORDER = {TrustTier.basic: 0, TrustTier.verified: 1}
NUSD_PER_USD_PER_1M = 1000  # $1 per 1M tokens = 1,000 nUSD per token


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

    @classmethod
    def from_routing_stats(
        cls,
        replica_id: str,
        stats: Mapping[str, Any],
        load: float | None = None,
        registry: Mapping[str, ProviderTerms] | None = None,
    ) -> ReplicaStats | None:
        """From `record_routing_stats()`'s dict; None until the replica has reported who it
        is. Keys: provider_id, trust_tier, price_floor_pct, healthy, draining, ongoing.

        A node's labels are self-declared (Ray trusts every node that has the cluster
        token), so where `registry` is given (the provider registry's terms by provider id)
        its tier, price floor and status win over what the replica reports, and a provider it
        does not know is `basic` at the price floor it asks. A replica's own word that its
        node is draining always counts.
        """
        if "provider_id" not in stats:
            return None
        provider_id = str(stats["provider_id"])
        tier = stats.get("trust_tier")
        trust = TrustTier(tier) if tier in TIER_ORDER else TrustTier.basic
        floor = max(0, int(stats.get("price_floor_pct") or 0))
        draining = bool(stats.get("draining", False))
        if registry is not None:
            terms = registry.get(provider_id)
            if terms is None:
                trust = TrustTier.basic
            else:
                trust, floor = terms.trust_tier, terms.price_floor_pct
                draining = draining or not terms.takes_requests
        return cls(
            replica_id=replica_id,
            provider_id=provider_id,
            trust_tier=trust,
            price_floor_pct=floor,
            healthy=bool(stats.get("healthy", True)),
            draining=draining,
            load=float(stats.get("ongoing", 0) if load is None else load),
        )


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


@dataclass(frozen=True)
class NoCandidate:
    reason: NoProviderReason
    message: str


def tier_satisfies(offered: TrustTier, required: TrustTier | None) -> bool:
    return required is None or TIER_ORDER[offered] >= TIER_ORDER[required]


def price_limit(catalog: Price, requirements: Requirements) -> Price:
    """The most a request allows per token: its max_price, or the catalog price."""
    return requirements.max_price or catalog


def fitting_providers(
    registry: Mapping[str, ProviderTerms], requirements: Requirements, catalog: Price
) -> set[str]:
    """Registered providers whose terms fit the request, whether or not a replica of theirs
    is up yet (a drained node's replacement may start on any of them)."""
    limit = price_limit(catalog, requirements)
    return {
        provider_id
        for provider_id, terms in registry.items()
        if terms.takes_requests
        and tier_satisfies(terms.trust_tier, requirements.trust_tier)
        and provider_price(catalog, terms.price_floor_pct).within(limit)
    }


def rank(
    replicas: Iterable[ReplicaStats],
    requirements: Requirements,
    catalog: Price,
    model_id: str = "",
) -> Ranked | NoCandidate:
    """The replicas that may serve the request, best first, or why there are none."""
    online = list(replicas)
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
    affordable.sort(
        key=lambda c: (
            c.replica.draining,
            not c.replica.healthy,
            c.replica.load,
            c.replica.price_floor_pct,
            c.replica.replica_id,
        )
    )
    return Ranked(tuple(affordable))


def no_candidate_error(none: NoCandidate, retry_after_s: int = 5) -> APIError:
    """The spec's 503 `service_unavailable`, its `code` naming the reason."""
    return APIError(
        503,
        none.message,
        code=none.reason.value,
        headers={"Retry-After": str(retry_after_s)},
    )


# --- the request's "provider" object ---------------------------------------------------------


def _usd_per_1m_to_nusd(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise invalid_request(f"{param} must be a number of USD per 1M tokens.", param=param)
    try:
        amount = Decimal(repr(value) if isinstance(value, float) else str(value))
    except InvalidOperation:
        raise invalid_request(f"{param} must be a number.", param=param) from None
    if not amount.is_finite() or amount < 0:
        raise invalid_request(f"{param} must be a non-negative number.", param=param)
    return int(amount * NUSD_PER_USD_PER_1M)  # whole nano-dollars, rounded down


def parse_requirements(
    provider: Any, catalog: Price, default_tier: TrustTier | None = None
) -> Requirements:
    """`Requirements` from a request body's `"provider"` object (None when absent).

    `{"trust_tier": "basic" | "verified", "max_price": {"prompt": usd_per_1m,
    "completion": usd_per_1m}}`; other OpenRouter keys are ignored. Raises the 400 APIError.
    """
    if provider is None:
        return Requirements(trust_tier=default_tier)
    if not isinstance(provider, Mapping):
        raise invalid_request("provider must be an object.", param="provider")
    tier = default_tier
    raw_tier = provider.get("trust_tier")
    if raw_tier is not None:
        if raw_tier not in TIER_ORDER:
            raise invalid_request(
                "provider.trust_tier must be 'basic' or 'verified'.", param="provider.trust_tier"
            )
        tier = TrustTier(raw_tier)
    max_price = None
    raw_price = provider.get("max_price")
    if raw_price is not None:
        if not isinstance(raw_price, Mapping):
            raise invalid_request(
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
