"""The caller's account over the API (a consumer key):

    GET /v1/credits                          balance, reserved, grants and the plan's terms
    GET /v1/usage?start=&end=&group_by=      usage and spend in [start, end) (default: the
                                             last 30 days), by day, model or customer tag

The account is the caller's key's, never a field of the request. Both read SQL (in a thread),
so they are served by the accounts deployment, not the inference ingress
(`serve_app.forwarding`).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Request

from billing.reports import credits_summary, usage_report
from serve_app.routes_keys import Moment, Svc, time_range

router = APIRouter()


@router.get("/v1/credits")
async def credits(request: Request, svc: Svc) -> dict[str, Any]:
    account_id = await svc.gate.account(request)
    summary = await asyncio.to_thread(credits_summary, svc.db, svc.redis, svc.plans, account_id)
    return {"object": "credits", **summary.to_json()}


@router.get("/v1/usage")
async def usage(
    request: Request,
    svc: Svc,
    start: Moment = None,
    end: Moment = None,
    group_by: Literal["day", "model", "customer"] = "day",
) -> dict[str, Any]:
    account_id = await svc.gate.account(request)
    since, until = time_range(start, end)
    rows = await asyncio.to_thread(
        usage_report, svc.db, start=since, end=until, group_by=group_by, account_id=account_id
    )
    return {
        "object": "list",
        "start": since.isoformat(),
        "end": until.isoformat(),
        "group_by": group_by,
        "data": [row.to_json() for row in rows],
    }
