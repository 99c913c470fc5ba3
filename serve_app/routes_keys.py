"""An account's API keys with their usage and spend, over the API (a consumer key):

    GET /v1/keys?start=&end=      every key of the caller's account, newest first, with what
                                  each was billed in [start, end) (default: the last 30 days)
    GET /v1/keys/{id}?start=&end= one of them; another account's key is 404, as a missing one

The account is the caller's key's, never a field of the request. A key's secret is never
shown again; its prefix, name, times (created, last used, revoked, expires) and usage are.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request

from billing import key_usage
from kernel.errors import InvalidRequest, NotFound
from serve_app.services import Services, services

router = APIRouter()
Svc = Annotated[Services, Depends(services)]
DEFAULT_DAYS = 30
Moment = Annotated[str | None, Query(max_length=64)]


def _utc(value: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an ISO 8601 date or time.", param=name) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def time_range(start: str | None, end: str | None) -> tuple[datetime, datetime]:
    until = _utc(end, "end") if end else datetime.now(UTC)
    try:
        since = _utc(start, "start") if start else until - timedelta(days=DEFAULT_DAYS)
    except OverflowError:  # `end` in the first days of year 1: no 30 days before it
        raise InvalidRequest("Give 'start' too: 'end' is too early.", param="start") from None
    if since >= until:
        raise InvalidRequest("'start' must be before 'end'.", param="start")
    return since, until


async def _listed(
    request: Request, svc: Services, start: str | None, end: str | None
) -> tuple[list[key_usage.KeyWithUsage], datetime, datetime]:
    account_id = await svc.gate.account(request)
    since, until = time_range(start, end)
    keys = await asyncio.to_thread(
        key_usage.keys_with_usage, svc.db, account_id=account_id, start=since, end=until
    )
    return keys, since, until


@router.get("/v1/keys")
async def list_keys(request: Request, svc: Svc, start: Moment = None,
                    end: Moment = None) -> dict[str, Any]:  # fmt: skip
    keys, since, until = await _listed(request, svc, start, end)
    return {
        "object": "list",
        "start": since.isoformat(),
        "end": until.isoformat(),
        "data": [k.to_json() for k in keys],
    }


@router.get("/v1/keys/{key_id}")
async def get_key(request: Request, svc: Svc, key_id: Annotated[int, Path(ge=1, le=2**62)],
                  start: Moment = None, end: Moment = None) -> dict[str, Any]:  # fmt: skip
    keys, since, until = await _listed(request, svc, start, end)
    for k in keys:
        if k.key.id == key_id:
            return {**k.to_json(), "start": since.isoformat(), "end": until.isoformat()}
    raise NotFound(f"There is no key {key_id} in this account.", code="key_not_found")
