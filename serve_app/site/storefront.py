"""The prepaid-credits storefront's figures, from the plans file's bundles and the catalog's
prices (never retyped): what a bundle buys, and the most a day can cost at its cap.

A token's price depends on the model and on its direction (prompt or completion), so a
bundle buys a range of tokens: the fewest where every token is billed at the dearest price
of any listed model, the most at the cheapest model's dearer direction. The most a day can
cost at a cap is the cap at the dearest price, the bound a customer can budget with.
"""

from __future__ import annotations

from dataclasses import dataclass

from billing.plans import Bundle, Plans
from cluster.catalog import CatalogModel

# The prepaid-credits site's example request size, for "requests per day".
EXAMPLE_TOKENS_PER_REQUEST = 800


@dataclass(frozen=True)
class Price:
    model: CatalogModel
    nusd_per_token: int  # the model's dearer direction


def dearer(model: CatalogModel) -> Price:
    return Price(model, max(model.input_nusd_per_token, model.output_nusd_per_token))


@dataclass(frozen=True)
class Offer:
    name: str
    bundle: Bundle
    fewest_tokens: int
    most_tokens: int
    dearest: Price
    cheapest: Price
    requests_per_day: int | None  # at the daily cap, EXAMPLE_TOKENS_PER_REQUEST each
    max_spend_per_day_nusd: int | None  # the cap at the dearest price; None: no cap


def offers(plans: Plans, models: list[CatalogModel]) -> list[Offer]:
    """The bundles, cheapest first; empty where no priced model is listed."""
    prices = [dearer(m) for m in models if dearer(m).nusd_per_token > 0]
    if not prices:
        return []
    dearest = max(prices, key=lambda p: p.nusd_per_token)
    cheapest = min(prices, key=lambda p: p.nusd_per_token)
    out = []
    for name, bundle in sorted(plans.bundles.items(), key=lambda item: item[1].price_nusd):
        cap = bundle.default_tokens_per_day or None
        out.append(
            Offer(
                name=name,
                bundle=bundle,
                fewest_tokens=bundle.price_nusd // dearest.nusd_per_token,
                most_tokens=bundle.price_nusd // cheapest.nusd_per_token,
                dearest=dearest,
                cheapest=cheapest,
                requests_per_day=None if cap is None else cap // EXAMPLE_TOKENS_PER_REQUEST,
                max_spend_per_day_nusd=None if cap is None else cap * dearest.nusd_per_token,
            )
        )
    return out
