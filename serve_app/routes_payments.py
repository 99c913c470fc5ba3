"""Payment routes: signup, buying credit bundles, Stripe's webhook, provider payouts.

- `POST /v1/auth/signup` (no key) `{"email", "password"}` → 201: the account on the free
  plan with its $10 of credits and a first API key (its secret shown only here); sign-ups
  per client IP and network are throttled before the password is hashed (`serve_app.throttle`:
  429 `rate_limit` with `Retry-After`). With SMTP configured the credits wait for the link
  mailed to the address: `GET /v1/auth/verify?token=…` grants them, once.
- `POST /v1/billing/checkout` (API key) `{"bundle": "solo"|"team"|"scale", "daily_cap":
  false}` → a Stripe Checkout Session: `{"id": "cs_…", "url": "https://checkout.stripe.com/…",
  …}`. Paid, it moves the account to the paid plan (credits its only limit); `"daily_cap":
  true` asks for the bundle's daily cap as well (a capped budget, the storefront's promise).
- `POST /v1/billing/stripe/webhook` (no key; `Stripe-Signature` verified on the raw body).
- `POST /v1/providers/me/stripe/onboarding` (API key of the account owning providers) → a
  Stripe Connect onboarding link.
- `GET /v1/providers/me/earnings?start=YYYY-MM-DD&end=YYYY-MM-DD` (same key) → earnings
  by day and model, payable balances and recent payouts.

SQL, argon2 and Stripe calls are blocking: they run in the thread pool. With no Stripe key
(or webhook secret) configured, the Stripe routes answer 503. The routes raise; what billing
raises (a bad signup, an unknown bundle, a bad webhook signature) and Stripe failing become
responses in `serve_app.errors`, the one mapping.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

import stripe
from fastapi import APIRouter, BackgroundTasks, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from billing import connect, earnings, email_verification, payouts, signup, webhooks
from billing.checkout import create_checkout
from billing.stripe_client import PaymentsNotConfigured
from kernel.errors import InvalidRequest
from kernel.money import CURRENCY, nusd_to_usd
from serve_app.services import Services, services
from serve_app.throttle import Throttle

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
    daily_cap: bool = Field(default=False, strict=True)


def _stripe(svc: Services) -> stripe.StripeClient:
    if svc.stripe is None:
        raise PaymentsNotConfigured("Payments are not available right now.")
    return svc.stripe


@router.post("/v1/auth/signup", status_code=201)
async def signup_route(body: SignupBody, request: Request, svc: Svc) -> JSONResponse:
    throttle = Throttle(svc.state, svc.settings)
    ip = throttle.client(request)
    result = await run_in_threadpool(
        signup.signup,
        svc.db,
        svc.redis,
        svc.plans,
        email=body.email,
        password=body.password,
        before_hash=lambda: throttle.check(throttle.signup, ip),  # 429 before argon2
        mailer=email_verification.mailer_for(svc.settings, svc.redis),
    )
    return JSONResponse(result.to_json(), status_code=201)


@router.get(email_verification.VERIFY_PATH)
async def verify_email_route(
    svc: Svc, token: Annotated[str, Query(max_length=128)] = ""
) -> dict[str, Any]:
    """The link mailed at signup: the account's signup credits, once."""
    account_id, granted = await run_in_threadpool(
        email_verification.verify, svc.db, svc.redis, svc.plans, token
    )
    return {
        "object": "email_verification",
        "account_id": account_id,
        "verified": True,
        "credits_granted_nusd": granted,
        "credits_granted_usd": nusd_to_usd(granted),
    }


@router.post("/v1/billing/checkout")
async def checkout_route(body: CheckoutBody, request: Request, svc: Svc) -> dict[str, Any]:
    account_id = await svc.gate.account(request)
    client = _stripe(svc)
    result = await run_in_threadpool(
        create_checkout,
        svc.db,
        client,
        svc.plans,
        svc.settings,
        account_id=account_id,
        bundle=body.bundle,
        capped_budget=body.daily_cap,
    )
    return result.to_json()


@router.post("/v1/billing/stripe/webhook")
async def webhook_route(request: Request, svc: Svc, background: BackgroundTasks) -> dict[str, Any]:
    secret = svc.settings.stripe_webhook_secret.get_secret_value()
    if not secret:
        raise PaymentsNotConfigured("Webhooks are not configured.")
    payload = await request.body()
    event = webhooks.verify(  # a bad signature: 400, so Stripe's dashboard shows why
        payload,
        request.headers.get("stripe-signature"),
        secret,
        tolerance=svc.settings.stripe_webhook_tolerance_s,
    )
    handler = webhooks.WebhookHandler(svc.db, svc.redis, svc.plans, svc.stripe, defer_fees=True)
    # Stripe failing here is a 503 (serve_app.errors): Stripe retries the event later.
    result = await run_in_threadpool(handler.handle, event)
    if handler.fees_due:  # Stripe's fees on the payment: read once Stripe has its answer
        background.add_task(handler.book_fees_due)
    return result.to_json()


def _owned(svc: Services, account_id: int) -> list[tuple[str, str]]:
    owned = connect.owned_providers(svc.db, account_id)
    if not owned:
        raise connect.NoProviders("This account owns no providers; register a GPU first.")
    return owned


@router.post("/v1/providers/me/stripe/onboarding")
async def onboarding_route(request: Request, svc: Svc) -> dict[str, Any]:
    account_id = await svc.gate.account(request)
    await run_in_threadpool(_owned, svc, account_id)
    client = _stripe(svc)
    link = await run_in_threadpool(
        connect.onboarding_link, svc.db, client, svc.settings, account_id=account_id
    )
    return link.to_json()


def _day(text: str | None, default: date, param: str) -> date:
    if text is None:
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"{param}: not a date (YYYY-MM-DD)", param=param) from None


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
        raise InvalidRequest("start is after end", param="start")
    if (last - first).days >= MAX_EARNINGS_DAYS:
        raise InvalidRequest(f"at most {MAX_EARNINGS_DAYS} days at a time", param="start")
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
        "currency": CURRENCY,
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
