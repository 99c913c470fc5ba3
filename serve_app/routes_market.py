"""Demand and reputation, public (`cluster.market`): what a provider needs to decide what to
lend, and what a consumer may want to know of who serves it.

    GET /v1/market                              per catalog model: requests and tokens per
                                                hour, providers serving it in the last hour;
                                                last week's earnings per GPU by its VRAM
    GET /v1/providers/{id}/reputation           a provider's last 7 days: uptime, requests
                                                served, usage-report strikes

Nothing here names an account, a customer or a request: counts and sums only.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, cast

from fastapi import APIRouter, Depends, Path

from cluster import market
from core.schema import utcnow
from kernel.errors import NotFound
from serve_app.catalog_file import catalog_of
from serve_app.services import Services, services

router = APIRouter()
Svc = Annotated[Services, Depends(services)]
ProviderId = Annotated[str, Path(min_length=1, max_length=64)]
T = TypeVar("T")
CACHE_S = 60.0  # public and unauthenticated: each ingress replica answers from its last read
_cache: dict[tuple[int, object], tuple[float, weakref.ref[Services], Any]] = {}


def cached(svc: Services, key: object, read: Callable[[], T]) -> T:
    """`read()` at most once per `CACHE_S` per key and `svc` in this process (the figures
    move slowly; anyone may ask, as often as they like)."""
    now = time.monotonic()
    hit = _cache.get((id(svc), key))
    if hit is not None and now - hit[0] < CACHE_S and hit[1]() is svc:
        return cast(T, hit[2])
    value = read()
    if len(_cache) > 10_000:  # providers asked about: bounded
        _cache.clear()
    _cache[(id(svc), key)] = (now, weakref.ref(svc), value)
    return value


def market_document(svc: Services) -> dict[str, Any]:
    now = utcnow()
    start, end = market.last_week(now)
    models = [m.id for m in catalog_of(svc).models]
    return {
        "object": "market",
        "models": [d.to_json() for d in market.demand(svc.db, models, now=now)],
        "gpu_earnings": {
            "week": {"start": start.isoformat(), "end": end.isoformat()},
            "data": [e.to_json() for e in market.gpu_earnings(svc.db, now=now)],
        },
    }


def current_market(svc: Services) -> dict[str, Any]:
    """The market document as this process last read it (at most `CACHE_S` old)."""
    return cached(svc, "market", lambda: market_document(svc))


@router.get("/v1/market")
async def get_market(svc: Svc) -> dict[str, Any]:
    return await asyncio.to_thread(current_market, svc)


@router.get("/v1/providers/{provider_id}/reputation")
async def get_reputation(provider_id: ProviderId, svc: Svc) -> dict[str, Any]:
    def read() -> dict[str, market.Reputation]:
        return market.reputation(svc.db, [provider_id])

    found = await asyncio.to_thread(cached, svc, ("reputation", provider_id), read)
    if provider_id not in found:
        raise NotFound(f"No provider '{provider_id}'.", code="provider_not_found")
    return {"object": "provider.reputation", **found[provider_id].to_json()}
