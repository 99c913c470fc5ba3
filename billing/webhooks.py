"""Stripe webhooks: verified on the raw body, applied exactly once, in any order.

`verify(payload, header, secret)` checks the `Stripe-Signature` header (HMAC-SHA256 of
`"{t}.{body}"`, any `v1` may match, at most `tolerance` seconds old) with stripe-python's
`WebhookSignature` and returns the event as a dict; a bad or stale signature raises
`BadSignature` before anything is read or written.

`WebhookHandler.handle(event)` applies one event in one SQL transaction whose first write is
the event's id (`stripe_events`, primary key): a duplicate, even a concurrent one, finds the
id and changes nothing. Every event is recorded, handled or not. Redis (the fast copy of
balances and limits) is updated after the commit; if that fails, Redis is behind SQL until
`darkgpu admin redis rebuild` (reconcile reports it).

Handled:
- `checkout.session.completed` / `.async_payment_succeeded`: when `payment_status` is
  `paid`, grant the amount paid as credits (payment clearing → customer credits, once per
  session) and move the account to the `paid` plan, whose only limit is its credits (buying
  never lowers a daily allowance); the bundle's daily cap applies only where the customer chose
  a capped budget at checkout. Custom plans keep their limits.
  A refund or dispute that arrived first is applied right after the grant.
- `checkout.session.async_payment_failed`: the purchase is marked failed.
- `charge.refunded` (cumulative `amount_refunded`) and `charge.dispute.created`: the new
  part is clawed back from the account's available credits (never below zero; credits held
  by requests in flight are not available); what could not be clawed back is booked as a
  loss and the account is flagged (`account_flags`). Before the purchase is fulfilled they
  are only remembered. Every dispute also flags its account `dispute_open` (its providers'
  payouts are held) until `charge.dispute.closed` resolves that flag.
- `account.updated`: the Connect account's `payouts_enabled` / `details_submitted`, applied
  only if not older than what is stored.

After a checkout, refund or dispute event about a DarkGPU payment commits, Stripe's fees on
that payment are read from its balance transactions and booked (billing.fees). That read is
outside the event's transaction and never fails the event: a fee not booked yet is booked by
`darkgpu admin fees sync` (which `admin reconcile` runs first) and reported until it is.

Credits are non-refundable for customers; refunds happen only from Stripe's dashboard.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import stripe
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing import accounts, fees, ledger, sync
from billing import redis_state as rs
from billing.checkout import META_ACCOUNT, META_BUNDLE, new_payment
from billing.plans import Plans
from billing.stripe_client import plain
from core.schema import (
    Account,
    AccountFlag,
    AccountLimits,
    LedgerAccount,
    LedgerKind,
    PaymentStatus,
    PayoutAccount,
    StripeEvent,
    StripeMovement,
    StripePayment,
    utcnow,
)
from kernel import redis_keys as rk
from kernel.errors import InvalidRequest
from kernel.money import CURRENCY, NUSD_PER_CENT

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

PAID_PLAN = "paid"
PAYMENT_LOSSES = ledger.AccountSpec(
    "platform:payment_losses", LedgerKind.platform_revenue, allow_negative=True
)
"""Refunded or disputed money whose credits were already spent (contra-revenue)."""
FEE_EVENTS = frozenset(
    {
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
        "charge.refunded",
        "charge.dispute.created",
        "charge.dispute.closed",
    }
)
"""Events after which the payment's balance transactions may carry a fee to book."""
DISPUTE_OPEN = "dispute_open"
"""The flag every dispute raises on its account until `charge.dispute.closed`: the account's
providers are not paid meanwhile (billing.flags)."""

# Redis: take up to ARGV[1] from the balance, never below zero; returns what was taken.
TAKE = r"""
local bal = tonumber(redis.call('GET', KEYS[1]) or '0')
local take = tonumber(ARGV[1])
if bal < take then take = bal end
if take < 0 then take = 0 end
if take > 0 then redis.call('DECRBY', KEYS[1], string.format('%d', take)) end
return string.format('%d', take)
"""


class BadSignature(InvalidRequest):
    """A webhook body that Stripe did not sign (or not in time): a 400, so Stripe shows it."""

    code = "invalid_signature"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Webhook signature verification failed: {reason}")


def verify(
    payload: bytes, header: str | None, secret: str, *, tolerance: int = 300
) -> dict[str, Any]:
    """The event, if `header` signs `payload` with `secret` within `tolerance` seconds."""
    if not secret:
        raise BadSignature("no webhook secret configured")
    try:
        stripe.WebhookSignature.verify_header(payload, header, secret, tolerance)
        _not_from_the_future(str(header), tolerance)
        event = json.loads(payload)
    except stripe.SignatureVerificationError as exc:
        raise BadSignature(exc.user_message or "bad signature") from None
    except (UnicodeDecodeError, ValueError):
        raise BadSignature("the body is not a JSON event") from None
    if not isinstance(event, dict) or not isinstance(event.get("id"), str) or "type" not in event:
        raise BadSignature("the body is not a Stripe event")
    return event


def _not_from_the_future(header: str, tolerance: int) -> None:
    """stripe-python only refuses old timestamps; a signature dated ahead of our clock by more
    than the tolerance is refused too (it would stay replayable for longer)."""
    stamps = [item[2:] for item in header.split(",") if item.startswith("t=")]
    if not stamps or int(stamps[0]) > time.time() + tolerance:
        raise BadSignature("Timestamp outside the tolerance zone")


@dataclass(frozen=True)
class EventResult:
    id: str
    type: str
    outcome: str
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"received": True, "id": self.id, "type": self.type, "outcome": self.outcome}


@dataclass
class _Effects:
    """What to do in Redis after the commit."""

    add_balance: dict[int, int] = field(default_factory=dict)
    publish: set[int] = field(default_factory=set)
    taken: dict[int, int] = field(default_factory=dict)  # taken from Redis balances
    kept: dict[int, int] = field(default_factory=dict)  # of which clawed back in SQL

    def credit(self, account_id: int, nusd: int) -> None:
        self.add_balance[account_id] = self.add_balance.get(account_id, 0) + nusd

    def unused(self) -> dict[int, int]:
        return {a: n - self.kept.get(a, 0) for a, n in self.taken.items()}


@dataclass(frozen=True)
class _PaymentRef:
    payment_intent: str
    account_id: int
    bundle: str


def _obj(event: dict[str, Any]) -> dict[str, Any]:
    return event.get("data", {}).get("object", {}) or {}


def _when(event: dict[str, Any]) -> datetime:
    return datetime.fromtimestamp(int(event.get("created") or 0), UTC)


def _id(value: Any) -> str | None:
    """An expandable field: the id string, or the id of the expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _account_of(meta: dict[str, Any] | None, fallback: Any = None) -> int | None:
    raw = (meta or {}).get(META_ACCOUNT) or fallback
    try:
        return int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


class WebhookHandler:
    def __init__(
        self,
        engine: Engine,
        r: redis.Redis | None,
        plans: Plans,
        client: stripe.StripeClient | None = None,
        *,
        defer_fees: bool = False,
    ) -> None:
        """`defer_fees`: leave the Stripe fee reads an event calls for in `fees_due`, for the
        caller to run with `book_fees_due` once it has answered Stripe (the route does: a slow
        Stripe must not hold the webhook's answer)."""
        self.engine = engine
        self.redis = r
        self.plans = plans
        self.client = client
        self.defer_fees = defer_fees
        self.fees_due: list[str] = []
        self._take = r.register_script(TAKE) if r is not None else None
        self._handlers: dict[str, Callable[[dict[str, Any]], EventResult]] = {
            "checkout.session.completed": self._checkout_paid,
            "checkout.session.async_payment_succeeded": self._checkout_paid,
            "checkout.session.async_payment_failed": self._checkout_failed,
            "charge.refunded": self._charge_refunded,
            "charge.dispute.created": self._dispute_created,
            "charge.dispute.closed": self._dispute_closed,
            "account.updated": self._account_updated,
        }

    # --- entry point -----------------------------------------------------------------------

    def handle(self, event: dict[str, Any]) -> EventResult:
        if self.seen(event["id"]):
            return EventResult(event["id"], event["type"], "duplicate")
        handler = self._handlers.get(event["type"])
        if handler is None:
            return self._apply(event, lambda s, row, fx: _set(row, "ignored"))
        result = handler(event)
        payment_intent = _id(_obj(event).get("payment_intent"))
        if (
            event["type"] in FEE_EVENTS
            and result.outcome not in ("ignored", "duplicate")
            and payment_intent is not None
            and self.client is not None
        ):
            if self.defer_fees:
                self.fees_due.append(payment_intent)
            else:
                self._book_fees(payment_intent)
        return result

    def book_fees_due(self) -> None:
        """Run the fee reads `handle` left for later (`defer_fees`)."""
        due, self.fees_due = self.fees_due, []
        for payment_intent in dict.fromkeys(due):
            self._book_fees(payment_intent)

    def _book_fees(self, payment_intent: str) -> None:
        """Book Stripe's fees on the payment the committed event was about (best effort:
        the event stands either way; `admin fees sync` catches up)."""
        if self.client is None:
            return
        try:
            report = fees.record_payment_fees(self.engine, self.client, payment_intent)
        except Exception:
            log.exception("Stripe fees of %s not read; `admin fees sync` retries", payment_intent)
            return
        for text in report.pending:
            log.info("Stripe fee pending: %s", text)

    def seen(self, event_id: str) -> bool:
        with Session(self.engine) as session:
            return session.get(StripeEvent, event_id) is not None

    def _apply(
        self, event: dict[str, Any], work: Callable[[Session, StripeEvent, _Effects], None]
    ) -> EventResult:
        """Run `work` in one transaction that first records the event; then update Redis.
        Credits `work` took from Redis go back there if the transaction does not commit."""
        fx = _Effects()
        try:
            with Session(self.engine) as session, session.begin():
                row = StripeEvent(
                    id=event["id"],
                    type=str(event["type"])[:100],
                    stripe_created=int(event.get("created") or 0),
                    outcome="applied",
                )
                session.add(row)
                session.flush()
                work(session, row, fx)
                result = EventResult(row.id, row.type, row.outcome, row.detail)
        except IntegrityError:
            self._give_back(fx.taken)
            if self.seen(event["id"]):
                return EventResult(event["id"], event["type"], "duplicate")
            raise
        except BaseException:
            self._give_back(fx.taken)
            raise
        self._sync_redis(fx)
        return result

    # --- Redis -----------------------------------------------------------------------------

    def _sync_redis(self, fx: _Effects) -> None:
        unused = fx.unused()
        if not (fx.add_balance or fx.publish or any(unused.values())):
            return
        try:
            sync.after_commit(self.engine, self.redis, lambda r: self._apply_effects(r, fx, unused))
        except Exception:  # SQL is committed; Redis is behind until a rebuild
            log.exception("Redis not updated after a Stripe event; run `admin redis rebuild`")

    def _apply_effects(self, r: redis.Redis, fx: _Effects, unused: dict[int, int]) -> None:
        """The committed event's Redis side: balance changes, less what `_take_available`
        took and SQL did not keep (that goes back), and accounts whose limits changed."""
        for account_id, delta in fx.add_balance.items():
            delta += unused.pop(account_id, 0)
            if delta:
                rs.add_balance(r, account_id, delta)
        self._give_back(unused)
        for account_id in fx.publish:
            accounts.publish_account_state(self.engine, r, account_id)

    def _take_available(self, account_id: int, want: int, fx: _Effects) -> int | None:
        """Take up to `want` of the account's available credits in Redis (atomic): what
        requests in flight hold is not available. None without Redis (SQL balance only)."""
        if self.redis is None or self._take is None:
            return None
        if not rs.is_ready(self.redis):  # emptied since `_reversal` checked: Stripe retries
            raise RuntimeError("Redis holds no billing state; not clawing back now")
        taken = int(self._take(keys=[rk.balance(account_id)], args=[want]))
        fx.taken[account_id] = fx.taken.get(account_id, 0) + taken
        return taken

    def _give_back(self, taken: dict[int, int]) -> None:
        for account_id, amount in list(taken.items()):
            if amount > 0 and self.redis is not None:
                try:
                    rs.add_balance(self.redis, account_id, amount)
                except Exception:
                    log.exception("could not return %d nUSD to account %d", amount, account_id)
            taken.pop(account_id, None)

    # --- checkout --------------------------------------------------------------------------

    def _checkout_paid(self, event: dict[str, Any]) -> EventResult:
        cs = _obj(event)

        def work(session: Session, row: StripeEvent, fx: _Effects) -> None:
            payment = self._payment_for_session(session, cs)
            if payment is None:
                return _set(row, "ignored", "not a DarkGPU purchase or unknown account")
            if payment.status == PaymentStatus.paid.value:
                return _set(row, "already_fulfilled")
            if cs.get("payment_status") != "paid":
                return _set(row, "awaiting_payment", str(cs.get("payment_status")))
            currency = str(cs.get("currency") or CURRENCY).lower()
            amount = int(cs.get("amount_total") or 0)
            if currency != CURRENCY or amount <= 0:
                log.error("session %s paid %d %s: not granted", cs.get("id"), amount, currency)
                return _set(row, "ignored", f"unexpected amount {amount} {currency}")
            self._fulfil(session, payment, amount, event, fx)

        return self._apply(event, work)

    def _payment_for_session(self, session: Session, cs: dict[str, Any]) -> StripePayment | None:
        session_id = cs.get("id")
        pi = _id(cs.get("payment_intent"))
        payment = _locked(session, StripePayment.checkout_session_id == session_id)
        by_pi = _locked(session, StripePayment.payment_intent_id == pi) if pi else None
        if payment is None:
            payment = by_pi
        elif by_pi is not None and by_pi.id != payment.id:
            # a refund or dispute arrived first and only knew the PaymentIntent: merge
            payment.refunded_cents = max(payment.refunded_cents, by_pi.refunded_cents)
            payment.disputed_cents = max(payment.disputed_cents, by_pi.disputed_cents)
            session.delete(by_pi)
            session.flush()
        if payment is None:
            account_id = _account_of(cs.get("metadata"), cs.get("client_reference_id"))
            if account_id is None or session.get(Account, account_id) is None:
                return None
            payment = new_payment(
                account_id,
                str((cs.get("metadata") or {}).get(META_BUNDLE) or ""),
                int(cs.get("amount_total") or 0),
            )
            session.add(payment)
        payment.checkout_session_id = payment.checkout_session_id or session_id
        payment.payment_intent_id = payment.payment_intent_id or pi
        session.flush()
        return payment

    def _fulfil(
        self,
        session: Session,
        payment: StripePayment,
        amount_cents: int,
        event: dict[str, Any],
        fx: _Effects,
    ) -> None:
        when = _when(event)
        nusd = amount_cents * NUSD_PER_CENT
        key = f"purchase:{payment.checkout_session_id}"
        ledger.post_transfer(
            session,
            idempotency_key=key,
            kind="purchase",
            legs=[
                ledger.Leg(
                    ledger.PAYMENT_CLEARING, ledger.customer_credits(payment.account_id), nusd
                )
            ],
            memo=f"{payment.bundle or 'credits'} bundle, {payment.checkout_session_id}",
            event_at=when,
        )
        _movement(session, key, "charge", payment, amount_cents, -nusd, event["id"], when)
        payment.status = PaymentStatus.paid.value
        payment.amount_cents = amount_cents
        payment.paid_at = when
        payment.updated_at = utcnow()
        fx.credit(payment.account_id, nusd)
        if self._apply_bundle(session, payment):
            fx.publish.add(payment.account_id)
        # refunds or disputes that arrived before the payment was confirmed
        early = (("refund", payment.refunded_cents), ("dispute", payment.disputed_cents))
        for kind, cents in early:
            if cents > 0:
                clawed = _reverse(
                    session,
                    payment,
                    kind=kind,
                    cents=cents,
                    key=f"{kind}:deferred:{payment.id}",
                    event_id=event["id"],
                    stripe_id=payment.payment_intent_id or str(payment.checkout_session_id),
                    when=when,
                    available=None,
                )
                fx.credit(payment.account_id, -clawed)

    def _apply_bundle(self, session: Session, payment: StripePayment) -> bool:
        """A purchase moves the account to the paid plan, whose only limit is its credits:
        buying never lowers a daily allowance (a free account's 200,000 tokens/day does not
        become a bundle's 2,000). A customer who chose a capped budget at checkout gets the
        bundle's daily cap (a bigger capped bundle raises a cap it has, a smaller one never
        lowers it); an uncapped purchase leaves a cap the customer chose in place."""
        account_id = payment.account_id
        account = session.get(Account, account_id)
        offer = self.plans.bundles.get(payment.bundle)
        if account is None or offer is None or PAID_PLAN not in self.plans.plans:
            return False
        current = self.plans.plans.get(account.plan)
        if current is not None and current.custom:
            return False  # enterprise: limits are set by hand
        limits = session.get(AccountLimits, account_id)
        if limits is None:
            limits = AccountLimits(account_id=account_id)
            session.add(limits)
        if account.plan != PAID_PLAN:
            account.plan = PAID_PLAN
            limits.tokens_per_day = None  # the free plan's cap goes with the free plan
        if payment.capped_budget:
            cap = offer.default_tokens_per_day
            held = limits.tokens_per_day
            limits.tokens_per_day = cap if held is None else max(held, cap)
        limits.updated_at = utcnow()
        return True

    def _checkout_failed(self, event: dict[str, Any]) -> EventResult:
        cs = _obj(event)

        def work(session: Session, row: StripeEvent, fx: _Effects) -> None:
            payment = self._payment_for_session(session, cs)
            if payment is None:
                return _set(row, "ignored", "not a DarkGPU purchase")
            if payment.status == PaymentStatus.open.value:
                payment.status = PaymentStatus.failed.value
                payment.updated_at = utcnow()
            _set(row, "payment_failed")

        return self._apply(event, work)

    # --- refunds and disputes ------------------------------------------------------------

    def _charge_refunded(self, event: dict[str, Any]) -> EventResult:
        charge = _obj(event)
        return self._reversal(
            event,
            kind="refund",
            pi=_id(charge.get("payment_intent")),
            meta=charge.get("metadata"),
            cumulative_cents=int(charge.get("amount_refunded") or 0),
            stripe_id=str(charge.get("id")),
        )

    def _dispute_created(self, event: dict[str, Any]) -> EventResult:
        dispute = _obj(event)
        return self._reversal(
            event,
            kind="dispute",
            pi=_id(dispute.get("payment_intent")),
            meta=dispute.get("metadata"),
            cumulative_cents=int(dispute.get("amount") or 0),
            stripe_id=str(dispute.get("id")),
        )

    def _dispute_closed(self, event: dict[str, Any]) -> EventResult:
        """The dispute is over (won or lost): its `dispute_open` flag is resolved. A flag of
        credits it found spent stays for an operator."""
        stripe_id = str(_obj(event).get("id"))

        def work(session: Session, row: StripeEvent, fx: _Effects) -> None:
            found = session.scalars(
                select(AccountFlag).where(
                    AccountFlag.stripe_id == stripe_id,
                    AccountFlag.reason == DISPUTE_OPEN,
                    AccountFlag.resolved_at.is_(None),
                )
            ).all()
            if not found:
                return _set(row, "ignored", "no open dispute")
            for flag in found:
                flag.resolved_at = _when(event)

        return self._apply(event, work)

    def _reversal(
        self,
        event: dict[str, Any],
        *,
        kind: str,
        pi: str | None,
        meta: dict[str, Any] | None,
        cumulative_cents: int,
        stripe_id: str,
    ) -> EventResult:
        ref = self._payment_ref(pi, meta)
        # a rebuild reads SQL: never from inside the transaction below
        sync.ready_or_rebuilt(self.engine, self.redis)
        column = "refunded_cents" if kind == "refund" else "disputed_cents"

        def work(session: Session, row: StripeEvent, fx: _Effects) -> None:
            if ref is None:
                return _set(row, "ignored", "not a DarkGPU payment")
            payment = _locked(session, StripePayment.payment_intent_id == ref.payment_intent)
            if payment is None:
                if session.get(Account, ref.account_id) is None:
                    return _set(row, "ignored", "unknown account")
                payment = new_payment(ref.account_id, ref.bundle, 0)
                payment.payment_intent_id = ref.payment_intent
                session.add(payment)
                session.flush()
            delta = cumulative_cents - getattr(payment, column)
            if delta <= 0:
                return _set(row, "no_change")
            setattr(payment, column, cumulative_cents)
            payment.updated_at = utcnow()
            if kind == "dispute":  # holds the owner's payouts until the dispute closes
                session.add(
                    AccountFlag(
                        account_id=payment.account_id,
                        reason=DISPUTE_OPEN,
                        stripe_id=stripe_id,
                        unrecovered_nusd=0,
                        event_id=f"{event['id']}:open",
                    )
                )
            if payment.status != PaymentStatus.paid.value:
                return _set(row, "deferred", "applied when the payment is confirmed")
            account_id = payment.account_id
            taken = self._take_available(account_id, delta * NUSD_PER_CENT, fx)
            clawed = _reverse(
                session,
                payment,
                kind=kind,
                cents=delta,
                key=f"{kind}:{event['id']}",
                event_id=event["id"],
                stripe_id=stripe_id,
                when=_when(event),
                available=taken,
            )
            fx.kept[account_id] = fx.kept.get(account_id, 0) + clawed
            _set(row, "applied" if clawed == delta * NUSD_PER_CENT else "flagged")

        return self._apply(event, work)

    def _payment_ref(self, pi: str | None, meta: dict[str, Any] | None) -> _PaymentRef | None:
        """Which account and bundle a PaymentIntent paid for: our record, else the metadata
        on the object, else the PaymentIntent's own metadata (asked of Stripe)."""
        if not pi:
            return None
        with Session(self.engine) as session:
            payment = session.scalar(
                select(StripePayment).where(StripePayment.payment_intent_id == pi)
            )
            if payment is not None:
                return _PaymentRef(pi, payment.account_id, payment.bundle)
        if _account_of(meta) is None and self.client is not None:
            meta = plain(self.client.v1.payment_intents.retrieve(pi)).get("metadata")
        account_id = _account_of(meta)
        if account_id is None:
            return None
        return _PaymentRef(pi, account_id, str((meta or {}).get(META_BUNDLE) or ""))

    # --- Connect ---------------------------------------------------------------------------

    def _account_updated(self, event: dict[str, Any]) -> EventResult:
        acct = _obj(event)
        created = int(event.get("created") or 0)

        def work(session: Session, row: StripeEvent, fx: _Effects) -> None:
            found = session.scalar(
                select(PayoutAccount)
                .where(PayoutAccount.stripe_account_id == acct.get("id"))
                .with_for_update()
            )
            if found is None:
                return _set(row, "ignored", "unknown Connect account")
            if created < found.stripe_updated_s:
                return _set(row, "stale", "a newer account.updated was applied")
            found.payouts_enabled = bool(acct.get("payouts_enabled"))
            found.details_submitted = bool(acct.get("details_submitted"))
            found.stripe_updated_s = created
            found.updated_at = utcnow()

        return self._apply(event, work)


# --- helpers used inside the transaction ---------------------------------------------------


def _set(row: StripeEvent, outcome: str, detail: str | None = None) -> None:
    row.outcome = outcome
    row.detail = detail[:500] if detail else None


def _locked(session: Session, condition: Any) -> StripePayment | None:
    return session.scalar(
        select(StripePayment)
        .where(condition)
        .with_for_update()
        .execution_options(populate_existing=True)
    )


def _movement(
    session: Session,
    key: str,
    kind: str,
    payment: StripePayment,
    cents: int,
    clearing_nusd: int,
    event_id: str,
    when: datetime,
) -> None:
    session.add(
        StripeMovement(
            key=key,
            kind=kind,
            stripe_id=payment.payment_intent_id or str(payment.checkout_session_id),
            amount_cents=cents,
            clearing_nusd=clearing_nusd,
            account_id=payment.account_id,
            event_id=event_id,
            occurred_at=when,
        )
    )


def _reverse(
    session: Session,
    payment: StripePayment,
    *,
    kind: str,
    cents: int,
    key: str,
    event_id: str,
    stripe_id: str,
    when: datetime,
    available: int | None,
) -> int:
    """Book `cents` that left Stripe for a refund or dispute: claw back what the account can
    give (at most `available`, when given, and never below zero), book the rest as a loss and
    flag the account. Returns the nUSD clawed back."""
    want = cents * NUSD_PER_CENT
    credits = ledger.customer_credits(payment.account_id)
    ids = sorted(
        ledger.ensure_account(session, spec)
        for spec in (credits, ledger.PAYMENT_CLEARING, PAYMENT_LOSSES)
    )
    rows = session.scalars(
        select(LedgerAccount)
        .where(LedgerAccount.id.in_(ids))
        .order_by(LedgerAccount.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    balance = next(row.balance for row in rows if row.name == credits.name)
    clawed = min(want, max(balance, 0))
    if available is not None:
        clawed = min(clawed, available)
    unrecovered = want - clawed
    ledger.post_transfer(
        session,
        idempotency_key=key,
        kind=kind,
        legs=[
            ledger.Leg(credits, ledger.PAYMENT_CLEARING, clawed),
            ledger.Leg(PAYMENT_LOSSES, ledger.PAYMENT_CLEARING, unrecovered),
        ],
        memo=f"{kind} of {cents} cents on {stripe_id}",
        event_at=when,
    )
    session.add(
        StripeMovement(
            key=key,
            kind=kind,
            stripe_id=stripe_id,
            amount_cents=cents,
            clearing_nusd=want,
            account_id=payment.account_id,
            event_id=event_id,
            occurred_at=when,
        )
    )
    payment.clawed_back_nusd += clawed
    payment.unrecovered_nusd += unrecovered
    payment.updated_at = utcnow()
    if unrecovered:
        session.add(
            AccountFlag(
                account_id=payment.account_id,
                reason=f"{kind}_after_spend",
                stripe_id=stripe_id,
                unrecovered_nusd=unrecovered,
                event_id=f"{event_id}:{kind}" if "deferred" in key else event_id,
            )
        )
        log.warning(
            "account %d: %s of %d cents found %d nUSD already spent; flagged",
            payment.account_id,
            kind,
            cents,
            unrecovered,
        )
    return clawed
