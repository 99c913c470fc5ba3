"""Stripe's fees in the double-entry ledger, read from Stripe's balance transactions.

Stripe keeps its fee out of every charge: the platform receives the charge's `net`
(`amount - fee`), and a dispute costs a dispute fee besides the disputed amount. The
purchase and refund transfers book gross amounts against `platform:payment_clearing`; this
module books each balance transaction's `fee` as a transfer from the clearing account to
`platform:payment_fees`, so that the clearing account follows the money Stripe actually holds
(the sum of the balance transactions' `net`), and the fees are an expense the books show.

A fee Stripe gives back (a negative `fee`: a won dispute's reinstatement, or a refund on an
account whose pricing returns fees) is the reverse transfer. Each balance transaction is
posted once: its ledger key is `fee:<txn id>`, and the money Stripe moved is recorded beside it
(`stripe_movements`, kind `fee` / `fee_refund`, `stripe_id` the PaymentIntent it belongs to) so
that the daily reconciliation matches it one by one against the clearing entries.

What is read, for a payment (its PaymentIntent): the charge with its balance transaction
expanded, its refunds (listed, `data.balance_transaction` expanded) and its disputes (each
carries its `balance_transactions`). A balance transaction is booked only if Stripe's own
arithmetic holds (`net == amount - fee`, `fee` equal to the sum of `fee_details`), it is in the
platform's currency and it belongs to the object it was read from; anything else is reported,
never guessed. A charge whose balance transaction Stripe has not attached yet is reported as
pending: `record_payment_fees` is called again later (the webhook of the next event about the
payment, `darkgpu admin fees sync`, or the reconciliation command before it checks).

Fees are read outside the webhook's transaction and after it commits: a Stripe read that fails
never delays granting credits that were paid for.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import stripe
from sqlalchemy import Engine, and_, or_, select
from sqlalchemy.orm import Session

from billing import ledger
from billing.stripe_client import error_text, plain
from core.schema import LedgerKind, PaymentStatus, StripeMovement, StripePayment
from kernel.money import CURRENCY, NUSD_PER_CENT

log = logging.getLogger(__name__)

PAYMENT_FEES = ledger.AccountSpec(
    "platform:payment_fees", LedgerKind.platform_revenue, allow_negative=True
)
"""What Stripe kept as fees: an expense, held (like payment losses) as a platform account that
runs negative, so no new ledger kind is needed."""

FEE_KIND = "stripe_fee"
FEE_REFUND_KIND = "stripe_fee_refund"
MOVEMENT_FEE = "fee"
MOVEMENT_FEE_REFUND = "fee_refund"
LIST_LIMIT = 100


@dataclass
class FeeReport:
    """What one pass over payments did: transfers posted, balance transactions not attached
    yet (`pending`), and ones refused (`problems`)."""

    payments: int = 0
    posted: list[str] = field(default_factory=list)
    posted_nusd: int = 0
    pending: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def merge(self, other: FeeReport) -> None:
        self.payments += other.payments
        self.posted += other.posted
        self.posted_nusd += other.posted_nusd
        self.pending += other.pending
        self.problems += other.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "payments": self.payments,
            "posted": len(self.posted),
            "posted_nusd": self.posted_nusd,
            "pending": self.pending,
            "problems": self.problems,
        }


@dataclass(frozen=True)
class _Txn:
    """A balance transaction as read, with the object it was read from."""

    source: str
    data: dict[str, Any]


def _id(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _items(listing: Any) -> Iterable[dict[str, Any]]:
    """Every item of a Stripe list, following `has_more` pages."""
    if isinstance(listing, stripe.ListObject):
        for item in listing.auto_paging_iter():
            yield plain(item)
        return
    yield from (listing or {}).get("data", [])


def read_transactions(
    client: stripe.StripeClient, payment_intent: str
) -> tuple[list[_Txn], list[str]]:
    """The balance transactions of a payment (charge, refunds, disputes), and notes on those
    Stripe has not attached yet."""
    pending: list[str] = []
    txns: list[_Txn] = []
    pi = plain(
        client.v1.payment_intents.retrieve(
            payment_intent, params={"expand": ["latest_charge.balance_transaction"]}
        )
    )
    charge = pi.get("latest_charge")
    if not isinstance(charge, dict) or charge.get("status") != "succeeded":
        pending.append(f"{payment_intent}: no succeeded charge yet")
    elif not isinstance(charge.get("balance_transaction"), dict):
        pending.append(f"{charge.get('id')}: Stripe has not attached its balance transaction")
    else:
        txns.append(_Txn(str(charge["id"]), charge["balance_transaction"]))
    refunds = client.v1.refunds.list(
        params={
            "payment_intent": payment_intent,
            "limit": LIST_LIMIT,
            "expand": ["data.balance_transaction"],
        }
    )
    for refund in _items(refunds):
        txn = refund.get("balance_transaction")
        if isinstance(txn, dict):
            txns.append(_Txn(str(refund.get("id")), txn))
        elif refund.get("status") in ("pending", "succeeded"):
            pending.append(f"{refund.get('id')}: Stripe has not attached its balance transaction")
    disputes = client.v1.disputes.list(params={"payment_intent": payment_intent, "limit": 100})
    for dispute in _items(disputes):
        for txn in dispute.get("balance_transactions") or []:
            if isinstance(txn, dict):
                txns.append(_Txn(str(dispute.get("id")), txn))
    return txns, pending


def _refusal(txn: _Txn) -> str | None:
    """Why a balance transaction cannot be booked as read (None: it can)."""
    t = txn.data
    ident = t.get("id")
    if t.get("object") != "balance_transaction" or not isinstance(ident, str):
        return f"{txn.source}: not a balance transaction"
    if str(t.get("currency") or "").lower() != CURRENCY:
        return f"{ident}: in {t.get('currency')!r}, the books are in {CURRENCY}"
    try:
        amount, fee, net = int(t["amount"]), int(t["fee"]), int(t["net"])
        details = sum(int(d["amount"]) for d in t.get("fee_details") or [])
    except (KeyError, TypeError, ValueError):
        return f"{ident}: amount, fee, net or fee_details missing"
    if net != amount - fee:
        return f"{ident}: net {net} is not amount {amount} less fee {fee}"
    if details != fee:
        return f"{ident}: fee {fee} but fee_details add up to {details}"
    if _id(t.get("source")) != txn.source:
        return f"{ident}: belongs to {_id(t.get('source'))}, read from {txn.source}"
    return None


def _memo(txn: dict[str, Any], source: str) -> str:
    details = ", ".join(f"{d.get('type')} {d.get('amount')}" for d in txn.get("fee_details") or [])
    available = datetime.fromtimestamp(int(txn.get("available_on") or 0), UTC).date()
    return (
        f"Stripe fee {txn['fee']} cents on {source} ({txn.get('reporting_category')}): "
        f"{details or 'no detail'}; net {txn['net']} available {available.isoformat()}"
    )[:500]


def post_fee(session: Session, payment: StripePayment, txn: _Txn) -> int | None:
    """Book one balance transaction's fee inside the caller's transaction; the nUSD moved to
    the fees account (negative when given back), or None if there is no fee or it is booked
    already."""
    t = txn.data
    fee = int(t["fee"])
    if fee == 0:
        return None
    key = f"fee:{t['id']}"
    nusd = abs(fee) * NUSD_PER_CENT
    if fee > 0:
        leg, kind, movement = (
            ledger.Leg(PAYMENT_FEES, ledger.PAYMENT_CLEARING, nusd),
            FEE_KIND,
            MOVEMENT_FEE,
        )
    else:
        leg, kind, movement = (
            ledger.Leg(ledger.PAYMENT_CLEARING, PAYMENT_FEES, nusd),
            FEE_REFUND_KIND,
            MOVEMENT_FEE_REFUND,
        )
    when = datetime.fromtimestamp(int(t.get("created") or 0), UTC)
    posted = ledger.post_transfer(
        session,
        idempotency_key=key,
        kind=kind,
        legs=[leg],
        memo=_memo(t, txn.source),
        event_at=when,
    )
    if posted is None:
        return None
    session.add(
        StripeMovement(
            key=key,
            kind=movement,
            stripe_id=payment.payment_intent_id or str(payment.checkout_session_id),
            amount_cents=abs(fee),
            clearing_nusd=nusd if fee > 0 else -nusd,
            account_id=payment.account_id,
            event_id=None,
            occurred_at=when,
        )
    )
    return nusd if fee > 0 else -nusd


def record_payment_fees(
    engine: Engine, client: stripe.StripeClient, payment_intent: str
) -> FeeReport:
    """Read a payment's balance transactions from Stripe and book the fees not booked yet
    (safe to repeat, and to run beside another call for the same payment)."""
    report = FeeReport(payments=1)
    with Session(engine) as session:
        known = session.scalar(
            select(StripePayment.id).where(StripePayment.payment_intent_id == payment_intent)
        )
    if known is None:
        report.problems.append(f"{payment_intent}: not a DarkGPU payment")
        return report
    txns, report.pending = read_transactions(client, payment_intent)
    bookable = []
    for txn in txns:
        refused = _refusal(txn)
        if refused:
            log.error("Stripe fee not booked: %s", refused)
            report.problems.append(refused)
        else:
            bookable.append(txn)
    with Session(engine) as session, session.begin():
        payment = session.get(StripePayment, known)
        assert payment is not None  # payments are never deleted
        for txn in bookable:
            moved = post_fee(session, payment, txn)
            if moved is not None:
                report.posted.append(f"fee:{txn.data['id']}")
                report.posted_nusd += moved
    return report


def payments_to_sync(engine: Engine, *, since: datetime | None = None) -> list[str]:
    """PaymentIntents worth reading: every paid one whose charge fee is not booked yet, and
    those with refunds or disputes (their balance transactions may carry fees too), changed
    since `since` when given."""
    with Session(engine) as session:
        booked = select(StripeMovement.stripe_id).where(StripeMovement.kind == MOVEMENT_FEE)
        reversed_ = or_(StripePayment.refunded_cents > 0, StripePayment.disputed_cents > 0)
        if since is not None:
            reversed_ = and_(reversed_, StripePayment.updated_at >= since)
        query = select(StripePayment.payment_intent_id).where(
            StripePayment.status == PaymentStatus.paid.value,
            StripePayment.payment_intent_id.is_not(None),
            or_(StripePayment.payment_intent_id.not_in(booked), reversed_),
        )
        return [pi for pi in session.scalars(query.order_by(StripePayment.id)) if pi]


def sync_fees(
    engine: Engine, client: stripe.StripeClient, *, since: datetime | None = None
) -> FeeReport:
    """Book the fees of every payment `payments_to_sync` names; a Stripe error on one payment
    is reported and the others go on."""
    report = FeeReport()
    for payment_intent in payments_to_sync(engine, since=since):
        try:
            report.merge(record_payment_fees(engine, client, payment_intent))
        except stripe.StripeError as exc:
            report.payments += 1
            report.problems.append(f"{payment_intent}: Stripe: {error_text(exc)}")
    return report
