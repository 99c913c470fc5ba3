"""An account's daily token caps over the API (a consumer key), as the console sets them:

    GET  /v1/caps                 the cap that applies, today's use, the customer-tag caps
    POST /v1/caps/daily           {"tokens_per_day": n | null}: the account's own cap, which
                                  only lowers the one that applies (null: none of its own)
    POST /v1/caps/customers       {"customer_tag": "acme" | "*", "tokens_per_day": n | null}:
                                  a customer tag's cap (`X-Customer-Id`; null removes it)
    POST /v1/caps/keys            {"key_id": 12, "tokens_per_day": n | null}: one of the
                                  account's API keys' cap (another account's key: 404)

The account is the caller's key's, never a field of the request (`billing.accounts`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from billing import accounts, reports
from kernel.errors import NotFound
from serve_app.services import Services, services

router = APIRouter()
Svc = Annotated[Services, Depends(services)]
Tokens = Annotated[int | None, Field(ge=0, le=accounts.MAX_TOKENS_PER_DAY, strict=True)]


class DailyCap(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens_per_day: Tokens


class KeyCap(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key_id: int = Field(ge=1, le=2**62, strict=True)
    tokens_per_day: Tokens


class CustomerCap(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_tag: str = Field(min_length=1, max_length=256)
    tokens_per_day: Tokens


def _caps(svc: Services, account_id: int) -> dict[str, Any]:
    caps = accounts.daily_caps(svc.db, svc.plans, account_id)
    summary = reports.credits_summary(svc.db, svc.redis, svc.plans, account_id)
    return {
        "object": "caps",
        "tokens_per_day": caps.applies,
        "plan_tokens_per_day": caps.ceiling,
        "own_tokens_per_day": caps.own,
        "tokens_used_today": summary.tokens_used_today,
        "resets_at": summary.resets_at,
        "customers": accounts.customer_caps(svc.db, account_id),
        "keys": {
            str(k.id): k.tokens_per_day
            for k in accounts.list_keys(svc.db, account_id)
            if k.tokens_per_day is not None and k.revoked_at is None
        },
    }


@router.get("/v1/caps")
async def get_caps(request: Request, svc: Svc) -> dict[str, Any]:
    account_id = await svc.gate.account(request)
    return await asyncio.to_thread(_caps, svc, account_id)


async def _changed(
    request: Request, svc: Services, change: Callable[[int], object]
) -> dict[str, Any]:
    """`change(account_id)` for the caller's account, then its caps as they now are."""
    account_id = await svc.gate.account(request)

    def save() -> dict[str, Any]:
        change(account_id)
        return _caps(svc, account_id)

    return await asyncio.to_thread(save)


@router.post("/v1/caps/daily")
async def set_daily(body: DailyCap, request: Request, svc: Svc) -> dict[str, Any]:
    return await _changed(request, svc, lambda account_id: accounts.set_own_cap(
        svc.db, svc.redis, account_id=account_id, tokens_per_day=body.tokens_per_day))  # fmt: skip


@router.post("/v1/caps/customers")
async def set_customer(body: CustomerCap, request: Request, svc: Svc) -> dict[str, Any]:
    return await _changed(request, svc, lambda account_id: accounts.set_customer_cap(
        svc.db, svc.redis, account_id=account_id, customer_tag=body.customer_tag,
        tokens_per_day=body.tokens_per_day))  # fmt: skip


@router.post("/v1/caps/keys")
async def set_key(body: KeyCap, request: Request, svc: Svc) -> dict[str, Any]:
    def change(account_id: int) -> None:
        try:
            accounts.set_key_cap(svc.db, svc.redis, key_id=body.key_id, account_id=account_id,
                                 tokens_per_day=body.tokens_per_day)  # fmt: skip
        except accounts.AccountError:  # another account's key, or none: the same answer
            raise NotFound(f"There is no key {body.key_id} in this account.",
                           code="key_not_found") from None  # fmt: skip

    return await _changed(request, svc, change)
