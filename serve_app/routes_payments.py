"""Payment routes: signup, buying credit bundles, Stripe's webhook, provider payouts.

- `POST /v1/auth/signup` (no key) `{"email", "password"}` → 201: the account on the free
  plan with its $10 of credits and a first API key (its secret shown only here).
- `POST /v1/billing/checkout` (API key) `{"bundle": "solo"|"team"|"scale"}` → a Stripe
  Checkout Session: `{"id": "cs_…", "url": "https://checkout.stripe.com/…", …}`.
- `POST /v1/billing/stripe/webhook` (no key; `Stripe-Signature` verified on the raw body).
- `POST /v1/providers/me/stripe/onboarding` (API key of the account owning providers) → a
  Stripe Connect onboarding link.
- `GET /v1/providers/me/earnings?start=YYYY-MM-DD&end=YYYY-MM-DD` (same key) → earnings
  by day and model, payable balances and recent payouts.

SQL, argon2 and Stripe calls are blocking: they run in the thread pool. With no Stripe key
(or webhook secret) configured, the Stripe routes answer 503.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

import stripe
from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from billing import connect, earnings, payouts, signup, webhooks
from billing.checkout import CheckoutError, create_checkout
from billing.money import nusd_to_usd
from billing.stripe_client import error_text
from serve_app.errors import APIError, invalid_request
from serve_app.services import Services, services

logger = logging.getLogger("darkgpu.payments")
router = APIRouter()
Svc = Annotated[Services, Depends(services)]
MAX_EARNINGS_DAYS = 366


class SignupBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    email: str = Field(max_length=320)
    password: str = Field(max_length=signup.MAX_PASSWORD_LEN)


class CheckoutBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(max_length=64)


def _stripe(svc: Services) -> stripe.StripeClient:
    if svc.stripe is None:
        raise APIError(503, "Payments are not available right now.", code="payments_unavailable")
    return svc.stripe


def _stripe_down(exc: stripe.StripeError) -> APIError:
    logger.error("Stripe call failed: %s", error_text(exc))
    return APIError(
        503, "The payment provider did not answer; try again shortly.", code="payments_unavailable"
    )


@router.post("/v1/auth/signup", status_code=201)
async def signup_route(body: SignupBody, svc: Svc) -> JSONResponse:
    try:
        result = await run_in_threadpool(
            signup.signup, svc.db, svc.redis, svc.plans, email=body.email, password=body.password
        )
    except signup.EmailTaken as exc:
        raise APIError(
            409, str(exc), type="invalid_request", param=exc.param, code=exc.code
        ) from None
    except signup.SignupError as exc:
        raise invalid_request(str(exc), param=exc.param, code=exc.code) from None
    return JSONResponse(result.to_json(), status_code=201)


@router.post("/v1/billing/checkout")
async def checkout_route(body: CheckoutBody, request: Request, svc: Svc) -> dict[str, Any]:
    account_id = await svc.gate.account(request)
    client = _stripe(svc)
    try:
        result = await run_in_threadpool(
            create_checkout,
            svc.db,
            client,
            svc.plans,
            svc.settings,
            account_id=account_id,
            bundle=body.bundle,
        )
    except CheckoutError as exc:
        raise APIError(exc.status, str(exc), param=exc.param, code=exc.code) from None
    except stripe.StripeError as exc:
        raise _stripe_down(exc) from None
    return result.to_json()


@router.post("/v1/billing/stripe/webhook")
async def webhook_route(request: Request, svc: Svc) -> dict[str, Any]:
    secret = svc.settings.stripe_webhook_secret.get_secret_value()
    if not secret:
        raise APIError(503, "Webhooks are not configured.", code="payments_unavailable")
    payload = await request.body()
    try:
        event = webhooks.verify(
            payload,
            request.headers.get("stripe-signature"),
            secret,
            tolerance=svc.settings.stripe_webhook_tolerance_s,
        )
    except webhooks.BadSignature as exc:
        raise invalid_request(
            f"Webhook signature verification failed: {exc}", code="invalid_signature"
        ) from None
    handler = webhooks.WebhookHandler(svc.db, svc.redis, svc.plans, svc.stripe)
    try:
        result = await run_in_threadpool(handler.handle, event)
    except stripe.StripeError as exc:  # Stripe retries the event later
        raise _stripe_down(exc) from None
    return result.to_json()


def _owned(svc: Services, account_id: int) -> list[tuple[str, str]]:
    owned = connect.owned_providers(svc.db, account_id)
    if not owned:
        raise APIError(
            404, "This account owns no providers; register a GPU first.", code="no_providers"
        )
    return owned


@router.post("/v1/providers/me/stripe/onboarding")
async def onboarding_route(request: Request, svc: Svc) -> dict[str, Any]:
    account_id = await svc.gate.account(request)
    await run_in_threadpool(_owned, svc, account_id)
    client = _stripe(svc)
    try:
        link = await run_in_threadpool(
            connect.onboarding_link, svc.db, client, svc.settings, account_id=account_id
        )
    except connect.NoProviders:
        raise APIError(404, "This account owns no providers.", code="no_providers") from None
    except stripe.StripeError as exc:
        raise _stripe_down(exc) from None
    return link.to_json()


def _day(text: str | None, default: date, param: str) -> date:
    if text is None:
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise invalid_request(f"{param}: not a date (YYYY-MM-DD)", param=param) from None


@router.get("/v1/providers/me/earnings")
async def earnings_route(
    request: Request,
    svc: Svc,
    start: Annotated[str | None, Query(description="First UTC day, YYYY-MM-DD")] = None,
    end: Annotated[str | None, Query(description="Last UTC day (inclusive)")] = None,
) -> dict[str, Any]:
    account_id = await svc.gate.account(request)
    today = datetime.now(UTC).date()
    last = _day(end, today, "end")
    first = _day(start, last - timedelta(days=29), "start")
    if first > last:
        raise invalid_request("start is after end", param="start")
    if (last - first).days >= MAX_EARNINGS_DAYS:
        raise invalid_request(f"at most {MAX_EARNINGS_DAYS} days at a time", param="start")
    return await run_in_threadpool(_earnings, svc, account_id, first, last)


def _earnings(svc: Services, account_id: int, first: date, last: date) -> dict[str, Any]:
    owned = _owned(svc, account_id)
    ids = [pid for pid, _name in owned]
    rows = earnings.earnings(svc.db, ids, start=first, end=last + timedelta(days=1))
    target = connect.payout_account(svc.db, account_id)
    with Session(svc.db) as session:
        payable = earnings.payable_balances(session, ids)
    recent = [p.to_json() for p in payouts.recent_payouts(svc.db, ids)]
    total = sum(r.earned_nusd for r in rows)
    total_payable = sum(payable.values())
    return {
        "object": "provider_earnings",
        "start": first.isoformat(),
        "end": last.isoformat(),
        "currency": "usd",
        "providers": [
            {
                "id": pid,
                "name": name,
                "payable_nusd": payable[pid],
                "payable_usd": nusd_to_usd(payable[pid]),
            }
            for pid, name in owned
        ],
        "total_earned_nusd": total,
        "total_earned_usd": nusd_to_usd(total),
        "payable_nusd": total_payable,
        "payable_usd": nusd_to_usd(total_payable),
        "payouts_enabled": bool(target and target.payouts_enabled),
        "stripe_account_id": target.stripe_account_id if target else None,
        "payouts": recent,
        "data": [r.to_json() for r in rows],
    }
