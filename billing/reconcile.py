"""Daily reconciliation (`darkgpu admin reconcile --date D [--csv F]`).

Checks, each passing or listing what does not match:
- `usage`: day D's usage rows (SQL) were charged exactly their cost to the customers'
  credits and split 95/5 to provider payables and platform revenue; and, while Redis still
  holds day D's token counters, each equals the SQL tokens of that day plus open
  reservations plus settled requests not yet drained.
- `double_entry`: the usage hash chain is intact and the double-entry ledger sums to zero
  (billing.verify.verify_ledger).
- `redis_balances`: every account's Redis balance equals its SQL credits less open
  reservations and settled usage not yet drained.
- `reservations`: no reservation is past its expiry (the reaper is keeping up).
- `usage_stream`: nothing waits in the usage stream, nothing is pending in the consumer
  group, and the dead-letter stream is empty.
- `stripe`: up to the end of day D, the money Stripe moved as recorded from webhooks and
  payouts (`stripe_movements`: charges, refunds, disputes, transfers, and Stripe's fees read
  from balance transactions) equals, one by one, the payment-clearing ledger entries; manual
  payment grants (`admin credits grant` from payment) are listed apart.
- `fees`: every purchase paid by the end of day D has its Stripe fee booked (billing.fees),
  and the fees account moved by exactly the fee records (day D's fees are shown).

On a live system counters move while they are read: a mismatch that disappears on a rerun
was traffic, one that stays is real. The day's journal for bookkeeping software is
billing.journal's (QuickBooks Online's import CSV).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, func, literal, select
from sqlalchemy.orm import Session

from billing import ledger
from billing import redis_state as rs
from billing.fees import (
    FEE_KIND,
    FEE_REFUND_KIND,
    MOVEMENT_FEE,
    MOVEMENT_FEE_REFUND,
    PAYMENT_FEES,
)
from billing.redis_replies import as_str, scored_members, stream_entries
from billing.verify import verify_ledger
from core.schema import (
    Account,
    AccountFlag,
    LedgerAccount,
    LedgerEntry,
    LedgerTransfer,
    PaymentStatus,
    StripeMovement,
    StripePayment,
    UsageEvent,
)
from kernel import redis_keys as rk
from kernel.money import NUSD_PER_CENT, nusd_to_usd
from kernel.usage_event import UsageRecord

if TYPE_CHECKING:
    import redis

STRIPE_KINDS = ("purchase", "refund", "dispute", "payout_post", FEE_KIND, FEE_REFUND_KIND)
MANUAL_KINDS = ("payment_grant",)
MAX_LISTED = 50


@dataclass
class Check:
    name: str
    problems: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_LISTED:
            self.problems.append(text)
        elif len(self.problems) == MAX_LISTED:
            self.problems.append("… more problems not listed")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "problems": self.problems, **self.info}


@dataclass
class ReconcileReport:
    date: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"date": self.date, "ok": self.ok, "checks": [c.to_json() for c in self.checks]}


def _day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


@dataclass
class _RedisView:
    """Open reservations and undrained usage, per account (and per day for tokens)."""

    hold_cost: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    # (account, YYYYMMDD: a hold's day as Redis writes it) → tokens
    hold_tokens: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    undrained_cost: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    # (account, YYYY-MM-DD: the usage record's day) → tokens
    undrained_tokens: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    stale: list[str] = field(default_factory=list)
    holds: int = 0
    stream_len: int = 0
    pending: int = 0
    dead: int = 0


def _redis_view(engine: Engine, r: redis.Redis, now_ms: int) -> _RedisView:
    view = _RedisView()
    for rid, score in scored_members(r.zrange(rk.HOLDS, 0, -1, withscores=True)):
        account, cost, day, prompt, most = r.hmget(
            rk.hold(rid), "account", "cost", "day", "prompt", "max"
        )
        if account is None:
            continue
        account_id = int(account)
        view.holds += 1
        view.hold_cost[account_id] += int(cost or 0)
        view.hold_tokens[(account_id, as_str(day))] += int(prompt or 0) + int(most or 0)
        if score < now_ms:
            view.stale.append(rid)
    entries = stream_entries(r.xrange(rk.USAGE_STREAM, "-", "+"))
    view.stream_len = len(entries)
    events = []
    for entry in entries:
        try:
            events.append(UsageRecord.from_stream(entry.fields))
        except ValueError:  # the meter dead-letters it; it never reaches a balance
            continue
    ids = [e.request_id for e in events]
    with Session(engine) as session:
        recorded = set(
            session.scalars(select(UsageEvent.request_id).where(UsageEvent.request_id.in_(ids)))
        )
    for e in events:
        if e.request_id in recorded:
            continue
        view.undrained_cost[e.account_id] += e.cost_nusd
        tokens = e.prompt_tokens + e.completion_tokens
        view.undrained_tokens[(e.account_id, e.usage_day)] += tokens
    try:
        summary = r.xpending(rk.USAGE_STREAM, rk.METER_GROUP)
        view.pending = int(summary.get("pending") or 0)
    except Exception:  # no group yet: nothing can be pending
        view.pending = 0
    view.dead = int(r.xlen(rk.DEAD_STREAM))
    return view


def reconcile(
    engine: Engine, r: redis.Redis | None, *, day: date, now: float | None = None
) -> ReconcileReport:
    now = time.time() if now is None else now
    view: _RedisView | None = None
    redis_error = "no Redis configured"
    if r is not None:
        try:
            view = _redis_view(engine, r, int(now * 1000))
            if not rs.is_ready(r):
                redis_error, view = "Redis holds no billing state (run `admin redis rebuild`)", None
        except Exception as exc:
            redis_error, view = f"Redis unreachable: {exc}", None
    checks = [
        _check_usage(engine, r, view, day, now),
        _check_double_entry(engine),
        _check_balances(engine, r, view, redis_error),
        _check_reservations(view, redis_error),
        _check_stream(view, redis_error),
        _check_stripe(engine, day),
        _check_fees(engine, day),
    ]
    return ReconcileReport(day.isoformat(), checks)


def _check_usage(
    engine: Engine, r: redis.Redis | None, view: _RedisView | None, day: date, now: float
) -> Check:
    check = Check("usage")
    sql_day = day.isoformat()
    key = literal("usage:") + UsageEvent.request_id
    with Session(engine) as session:
        n, tokens, cost, provider, platform = session.execute(
            select(
                func.count(),
                func.coalesce(func.sum(UsageEvent.prompt_tokens + UsageEvent.completion_tokens), 0),
                func.coalesce(func.sum(UsageEvent.cost_nusd), 0),
                func.coalesce(func.sum(UsageEvent.provider_share_nusd), 0),
                func.coalesce(func.sum(UsageEvent.platform_share_nusd), 0),
            ).where(UsageEvent.usage_day == sql_day)
        ).one()
        charged = dict(
            session.execute(
                select(LedgerAccount.kind, func.sum(LedgerEntry.amount))
                .join(LedgerEntry, LedgerEntry.ledger_account_id == LedgerAccount.id)
                .join(LedgerTransfer, LedgerTransfer.id == LedgerEntry.transfer_id)
                .join(UsageEvent, LedgerTransfer.idempotency_key == key)
                .where(UsageEvent.usage_day == sql_day, LedgerTransfer.kind == "usage")
                .group_by(LedgerAccount.kind)
            ).all()
        )
        per_account = dict(
            session.execute(
                select(
                    UsageEvent.account_id,
                    func.sum(UsageEvent.prompt_tokens + UsageEvent.completion_tokens),
                )
                .where(UsageEvent.usage_day == sql_day)
                .group_by(UsageEvent.account_id)
            ).all()
        )
        account_ids = list(session.scalars(select(Account.id)))
    check.info.update(
        requests=int(n),
        tokens=int(tokens),
        cost_nusd=int(cost),
        cost_usd=nusd_to_usd(int(cost)),
        provider_share_nusd=int(provider),
        platform_share_nusd=int(platform),
    )
    for kind, expected in (
        ("customer_credits", -int(cost)),
        ("provider_payable", int(provider)),
        ("platform_revenue", int(platform)),
    ):
        got = int(charged.get(kind) or 0)
        if got != expected:
            check.problem(
                f"{sql_day}: ledger {kind} moved {got} nUSD for usage, rows say {expected}"
            )
    if r is None or view is None:
        check.info["redis_day_counters"] = "not checked (Redis unavailable)"
        return check
    yyyymmdd = day.strftime("%Y%m%d")
    keys = [rk.day(a, yyyymmdd) for a in account_ids]
    values = r.mget(keys) if keys else []
    counted = 0
    for account_id, raw in zip(account_ids, values, strict=True):
        if raw is None:
            continue
        counted += 1
        expected = (
            int(per_account.get(account_id) or 0)
            + view.hold_tokens.get((account_id, yyyymmdd), 0)
            + view.undrained_tokens.get((account_id, sql_day), 0)
        )
        if int(raw) != expected:
            check.problem(
                f"account {account_id}: Redis counts {int(raw)} tokens on {sql_day}, "
                f"SQL + open reservations + undrained say {expected}"
            )
    check.info["redis_day_counters"] = counted
    return check


def _check_double_entry(engine: Engine) -> Check:
    check = Check("double_entry")
    result = verify_ledger(engine)
    for text in result.problems:
        check.problem(text)
    start = result.from_checkpoint
    check.info.update(
        usage_rows=result.usage_rows_total,  # the checkpoint's and those read after it
        verified_usage_rows=result.usage_rows,
        transfers=result.transfers,  # read after the checkpoint
        from_checkpoint=start.checkpoint_id if start else None,
    )
    return check


def _check_balances(
    engine: Engine, r: redis.Redis | None, view: _RedisView | None, error: str
) -> Check:
    check = Check("redis_balances")
    if r is None or view is None:
        check.problem(error)
        return check
    with Session(engine) as session:
        balances = ledger.customer_balances(session)
        for account_id in session.scalars(select(Account.id)):
            balances.setdefault(account_id, 0)
    ids = sorted(balances)
    values = r.mget([rk.balance(a) for a in ids]) if ids else []
    for account_id, raw in zip(ids, values, strict=True):
        expected = (
            balances[account_id]
            - view.hold_cost.get(account_id, 0)
            - view.undrained_cost.get(account_id, 0)
        )
        # no key is what admission reads as 0 (an account never granted anything has none)
        got = int(raw) if raw is not None else 0
        if got != expected:
            check.problem(
                f"account {account_id}: Redis balance {got} nUSD, SQL credits "
                f"{balances[account_id]} less reservations and undrained usage = {expected}"
            )
    check.info["accounts"] = len(ids)
    return check


def _check_reservations(view: _RedisView | None, error: str) -> Check:
    check = Check("reservations")
    if view is None:
        check.problem(error)
        return check
    check.info["open"] = view.holds
    for rid in view.stale:
        check.problem(f"reservation {rid} is past its expiry")
    return check


def _check_stream(view: _RedisView | None, error: str) -> Check:
    check = Check("usage_stream")
    if view is None:
        check.problem(error)
        return check
    check.info.update(waiting=view.stream_len, pending=view.pending, dead_letters=view.dead)
    if view.stream_len:
        check.problem(f"{view.stream_len} usage events wait in the stream (not in SQL yet)")
    if view.pending:
        check.problem(f"{view.pending} usage events are read but not acknowledged")
    if view.dead:
        check.problem(f"{view.dead} usage events are in the dead-letter stream")
    return check


def _check_stripe(engine: Engine, day: date) -> Check:
    check = Check("stripe")
    start, end = _day_bounds(day)
    clearing = ledger.PAYMENT_CLEARING.name
    with Session(engine) as session:
        entries = session.execute(
            select(
                LedgerTransfer.idempotency_key,
                LedgerTransfer.kind,
                func.sum(LedgerEntry.amount),
            )
            .join(LedgerEntry, LedgerEntry.transfer_id == LedgerTransfer.id)
            .join(LedgerAccount, LedgerAccount.id == LedgerEntry.ledger_account_id)
            .where(LedgerAccount.name == clearing, LedgerTransfer.event_at < end)
            .group_by(LedgerTransfer.idempotency_key, LedgerTransfer.kind)
        ).all()
        movements = session.execute(
            select(
                StripeMovement.key,
                StripeMovement.kind,
                StripeMovement.clearing_nusd,
                StripeMovement.amount_cents,
                StripeMovement.occurred_at,
            ).where(StripeMovement.occurred_at < end)
        ).all()
        flags = session.scalar(
            select(func.count()).select_from(AccountFlag).where(AccountFlag.resolved_at.is_(None))
        )
    booked = {k: (kind, int(amount)) for k, kind, amount in entries}
    recorded = {k: int(nusd) for k, _kind, nusd, _c, _w in movements}
    manual = 0
    for k, (kind, amount) in booked.items():
        if kind in MANUAL_KINDS:
            manual += amount
        elif k not in recorded:
            check.problem(f"clearing entry {k} ({kind}, {amount} nUSD) has no Stripe record")
    for k, nusd in recorded.items():
        got = booked.get(k, ("", 0))[1]
        if got != nusd:
            check.problem(f"Stripe record {k}: {nusd} nUSD, clearing booked {got}")
    day_totals: dict[str, int] = defaultdict(int)
    for _k, kind, _n, cents, when in movements:
        if start <= when < end:
            day_totals[f"{kind}_cents"] += int(cents)
    check.info.update(
        stripe_total_nusd=sum(recorded.values()),
        clearing_stripe_nusd=sum(a for k, (kind, a) in booked.items() if kind not in MANUAL_KINDS),
        manual_payment_grants_nusd=manual,
        day=dict(day_totals),
        open_account_flags=int(flags or 0),
    )
    return check


def _check_fees(engine: Engine, day: date) -> Check:
    check = Check("fees")
    start, end = _day_bounds(day)
    with Session(engine) as session:
        unbooked = session.scalars(
            select(StripePayment.payment_intent_id)
            .where(
                StripePayment.status == PaymentStatus.paid.value,
                StripePayment.paid_at < end,
                StripePayment.payment_intent_id.not_in(
                    select(StripeMovement.stripe_id).where(StripeMovement.kind == MOVEMENT_FEE)
                ),
            )
            .order_by(StripePayment.id)
        ).all()
        recorded = session.execute(
            select(
                StripeMovement.kind, StripeMovement.clearing_nusd, StripeMovement.occurred_at
            ).where(
                StripeMovement.kind.in_((MOVEMENT_FEE, MOVEMENT_FEE_REFUND)),
                StripeMovement.occurred_at < end,
            )
        ).all()
        booked = session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount), 0))
            .join(LedgerAccount, LedgerAccount.id == LedgerEntry.ledger_account_id)
            .join(LedgerTransfer, LedgerTransfer.id == LedgerEntry.transfer_id)
            .where(LedgerAccount.name == PAYMENT_FEES.name, LedgerTransfer.event_at < end)
        )
    for pi in unbooked:
        check.problem(f"payment {pi}: Stripe's fee is not booked (run `admin fees sync`)")
    expected = -sum(int(nusd) for _kind, nusd, _when in recorded)
    if int(booked or 0) != expected:
        check.problem(f"fees account moved {int(booked or 0)} nUSD, fee records say {expected}")
    day_cents = {MOVEMENT_FEE: 0, MOVEMENT_FEE_REFUND: 0}
    for kind, nusd, when in recorded:
        if start <= when < end:
            day_cents[kind] += abs(int(nusd)) // NUSD_PER_CENT
    check.info.update(
        fees_total_nusd=expected,
        day_fee_cents=day_cents[MOVEMENT_FEE],
        day_fee_refund_cents=day_cents[MOVEMENT_FEE_REFUND],
    )
    return check
