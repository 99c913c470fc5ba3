"""Buying a credit bundle: a Stripe Checkout Session (mode `payment`) for one bundle of
`configs/plans.toml`, priced inline from it (no Price objects to keep in sync).

Our account id and the bundle go into the metadata of the session and of its PaymentIntent
(Stripe does not copy the session's metadata onto the PaymentIntent, and refunds and
disputes only name the PaymentIntent), and the session is recorded in `stripe_payments`
as `open`. Credits are granted only by the webhook (billing.webhooks), once Stripe says paid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import stripe
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from billing.plans import Plans
from billing.stripe_client import plain
from core.schema import Account, AccountStatus, PaymentStatus, StripePayment
from core.settings import Settings
from kernel.errors import InvalidRequest
from kernel.money import CURRENCY, NUSD_PER_CENT, nusd_to_usd

META_ACCOUNT = "darkgpu_account_id"
META_BUNDLE = "darkgpu_bundle"


class CheckoutError(InvalidRequest):
    """A checkout that cannot start: an unknown bundle."""


class AccountCannotBuy(CheckoutError):
    """A 403 for an account that is not active (its type stays `invalid_request`, as the
    API has always answered it)."""

    status = 403


def new_payment(
    account_id: int,
    bundle: str,
    amount_cents: int,
    *,
    currency: str = CURRENCY,
    capped_budget: bool = False,
) -> StripePayment:
    """An open purchase, nothing refunded, disputed or taken back yet (its counters set here,
    not left to the INSERT: the webhooks read them before the row is flushed)."""
    return StripePayment(
        account_id=account_id,
        bundle=bundle,
        amount_cents=amount_cents,
        currency=currency,
        status=PaymentStatus.open.value,
        refunded_cents=0,
        disputed_cents=0,
        clawed_back_nusd=0,
        unrecovered_nusd=0,
        capped_budget=capped_budget,
    )


@dataclass(frozen=True)
class CheckoutResult:
    id: str
    url: str
    bundle: str
    amount_cents: int
    currency: str
    expires_at: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "checkout.session",
            **asdict(self),
            "amount_usd": nusd_to_usd(self.amount_cents * NUSD_PER_CENT),
        }


def metadata(account_id: int, bundle: str) -> dict[str, str]:
    return {META_ACCOUNT: str(account_id), META_BUNDLE: bundle}


def create_checkout(
    engine: Engine,
    client: stripe.StripeClient,
    plans: Plans,
    settings: Settings,
    *,
    account_id: int,
    bundle: str,
    capped_budget: bool = False,
) -> CheckoutResult:
    """`capped_budget`: the customer asks for the bundle's daily cap (a hard stop per UTC
    day, the storefront's promise); without it, credits are the only limit of the paid plan
    (billing.webhooks applies it when Stripe says paid)."""
    offer = plans.bundles.get(bundle)
    if offer is None:
        names = ", ".join(sorted(plans.bundles)) or "none"
        raise CheckoutError(
            f"Unknown bundle {bundle!r}; bundles: {names}.", param="bundle", code="unknown_bundle"
        )
    with Session(engine) as session:
        account = session.get(Account, account_id)
        if account is None or account.status != AccountStatus.active.value:
            raise AccountCannotBuy("This account cannot buy credits.", code="account_inactive")
        email = account.email
    meta = metadata(account_id, bundle)
    name = f"DarkGPU {bundle.title()} credits"
    params: dict[str, Any] = {
        "mode": "payment",
        "line_items": [
            {
                "quantity": 1,
                "price_data": {
                    "currency": CURRENCY,
                    "unit_amount": offer.price_cents,
                    "product_data": {
                        "name": name,
                        "description": f"${offer.price_usd} of prepaid inference credits"
                        + (
                            f"; daily cap {offer.default_tokens_per_day:,} tokens"
                            if capped_budget
                            else ""
                        ),
                    },
                },
            }
        ],
        "client_reference_id": str(account_id),
        "customer_email": email,
        "metadata": meta,
        "payment_intent_data": {"metadata": meta, "description": name},
        "success_url": settings.checkout_success_url,
        "cancel_url": settings.checkout_cancel_url,
    }
    created = plain(client.v1.checkout.sessions.create(params=params))  # type: ignore[arg-type]
    pi = created.get("payment_intent")
    payment = new_payment(
        account_id,
        bundle,
        int(created.get("amount_total") or offer.price_cents),
        currency=str(created.get("currency") or CURRENCY),
        capped_budget=capped_budget,
    )
    payment.checkout_session_id = created["id"]
    payment.payment_intent_id = pi if isinstance(pi, str) else None
    with Session(engine) as session, session.begin():
        session.add(payment)
    return CheckoutResult(
        id=created["id"],
        url=created["url"],
        bundle=bundle,
        amount_cents=offer.price_cents,
        currency=CURRENCY,
        expires_at=created.get("expires_at"),
    )


@dataclass(frozen=True)
class Purchase:
    """A bundle bought (or being bought) by an account, as its purchase history shows it."""

    id: int
    bundle: str
    amount_cents: int
    currency: str
    status: str
    refunded_cents: int
    disputed_cents: int
    created_at: datetime
    paid_at: datetime | None


def purchases(engine: Engine, account_id: int, *, limit: int = 100) -> list[Purchase]:
    """The account's Checkout purchases, newest first."""
    query = (
        select(StripePayment)
        .where(StripePayment.account_id == account_id)
        .order_by(StripePayment.id.desc())
        .limit(limit)
    )
    with Session(engine) as session:
        return [
            Purchase(
                id=p.id,
                bundle=p.bundle,
                amount_cents=p.amount_cents,
                currency=p.currency,
                status=p.status,
                refunded_cents=p.refunded_cents,
                disputed_cents=p.disputed_cents,
                created_at=p.created_at,
                paid_at=p.paid_at,
            )
            for p in session.scalars(query)
        ]
