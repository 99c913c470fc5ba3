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
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path

from cluster import market
from core.schema import utcnow
from kernel.errors import NotFound
from serve_app.services import Services, services
from serve_app.site.routes import catalog_of

router = APIRouter()
Svc = Annotated[Services, Depends(services)]
ProviderId = Annotated[str, Path(min_length=1, max_length=64)]


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


@router.get("/v1/market")
async def get_market(svc: Svc) -> dict[str, Any]:
    return await asyncio.to_thread(market_document, svc)


@router.get("/v1/providers/{provider_id}/reputation")
async def get_reputation(provider_id: ProviderId, svc: Svc) -> dict[str, Any]:
    found = await asyncio.to_thread(market.reputation, svc.db, [provider_id])
    if provider_id not in found:
        raise NotFound(f"No provider '{provider_id}'.", code="provider_not_found")
    return {"object": "provider.reputation", **found[provider_id].to_json()}
