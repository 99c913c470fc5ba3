"""Receipts: one purchase of credits (a `stripe_payments` row) as its buyer may print it.

What it shows comes from the purchase as the webhooks recorded it: the bundle, the amount and
currency charged, when it was started and paid, its status, and what was refunded or
disputed since (cumulative, in cents) with the credits that took back. A receipt is found
only within its own account: another account's purchase id is "no such receipt".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from core.schema import Account, StripePayment

STATUS_WORDS = {"open": "awaiting payment", "paid": "paid", "failed": "payment failed"}


@dataclass(frozen=True)
class Receipt:
    number: str
    account_id: int
    email: str
    bundle: str
    amount_cents: int
    currency: str
    status: str
    refunded_cents: int
    disputed_cents: int
    clawed_back_nusd: int
    reference: str | None  # Stripe's PaymentIntent (or Checkout Session) id
    created_at: datetime
    paid_at: datetime | None
    updated_at: datetime

    @property
    def status_words(self) -> str:
        return STATUS_WORDS.get(self.status, self.status)

    @property
    def net_cents(self) -> int:
        """What the buyer paid and kept paid: the amount less refunds."""
        return self.amount_cents - self.refunded_cents


def number_of(payment_id: int) -> str:
    return f"DG-{payment_id:06d}"


def receipt(engine: Engine, *, account_id: int, payment_id: int) -> Receipt | None:
    """The receipt of one of the account's purchases; None when it has no such purchase."""
    with Session(engine) as session:
        found = session.execute(
            select(StripePayment, Account.email)
            .join(Account, Account.id == StripePayment.account_id)
            .where(StripePayment.id == payment_id, StripePayment.account_id == account_id)
        ).first()
    if found is None:
        return None
    p, email = found
    return Receipt(
        number=number_of(p.id),
        account_id=p.account_id,
        email=email,
        bundle=p.bundle,
        amount_cents=p.amount_cents,
        currency=p.currency.upper(),
        status=p.status,
        refunded_cents=p.refunded_cents,
        disputed_cents=p.disputed_cents,
        clawed_back_nusd=p.clawed_back_nusd,
        reference=p.payment_intent_id or p.checkout_session_id,
        created_at=p.created_at,
        paid_at=p.paid_at,
        updated_at=p.updated_at,
    )
