"""Daily reconciliation (`darkgpu admin reconcile --date D [--csv F]`) and the bookkeeping
journal.

Checks, each passing or listing what does not match:
- `usage`: day D's usage rows (SQL) were charged exactly their cost to the customers'
  credits and split 95/5 to provider payables and platform revenue; and, while Redis still
  holds day D's token counters, each equals the SQL tokens of that day plus open
  reservations plus settled requests not yet drained.
- `double_entry`: the usage hash chain is intact and the double-entry ledger sums to zero
  (billing.reports.verify_ledger).
- `redis_balances`: every account's Redis balance equals its SQL credits less open
  reservations and settled usage not yet drained.
- `reservations`: no reservation is past its expiry (the reaper is keeping up).
- `usage_stream`: nothing waits in the usage stream, nothing is pending in the consumer
  group, and the dead-letter stream is empty.
- `stripe`: up to the end of day D, the money Stripe moved as recorded from webhooks and
  payouts (`stripe_movements`: charges, refunds, disputes, transfers) equals, one by one,
  the payment-clearing ledger entries; manual payment grants (`admin credits grant`
  from payment) are listed apart.

On a live system counters move while they are read: a mismatch that disappears on a rerun
was traffic, one that stays is real. `write_journal` writes one balanced journal per day
(date, journal, account, debit, credit, memo; amounts in dollars with cents; lines rounded
with largest remainders so each journal balances exactly).
"""

from __future__ import annotations

import csv
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, TextIO

from sqlalchemy import Engine, func, literal, select
from sqlalchemy.orm import Session

from billing import ledger
from billing import redis_keys as rk
from billing import redis_state as rs
from billing.money import nusd_to_usd
from billing.reports import verify_ledger
from billing.schema import (
    Account,
    AccountFlag,
    LedgerAccount,
    LedgerEntry,
    LedgerTransfer,
    StripeMovement,
    UsageEvent,
)

if TYPE_CHECKING:
    import redis

STRIPE_KINDS = ("purchase", "refund", "dispute", "payout_post")
MANUAL_KINDS = ("payment_grant",)
NUSD_PER_CENT = 10**7
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class _RedisView:
    """Open reservations and undrained usage, per account (and per day for tokens)."""

    hold_cost: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    hold_tokens: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    undrained_cost: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    undrained_tokens: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    stale: list[str] = field(default_factory=list)
    holds: int = 0
    stream_len: int = 0
    pending: int = 0
    dead: int = 0


def _redis_view(engine: Engine, r: redis.Redis, now_ms: int) -> _RedisView:
    view = _RedisView()
    for rid, score in r.zrange(rk.HOLDS, 0, -1, withscores=True):
        rid = _text(rid)
        account, cost, day, prompt, most = r.hmget(
            rk.hold(rid), "account", "cost", "day", "prompt", "max"
        )
        if account is None:
            continue
        account_id = int(account)
        view.holds += 1
        view.hold_cost[account_id] += int(cost or 0)
        view.hold_tokens[(account_id, _text(day))] += int(prompt or 0) + int(most or 0)
        if score < now_ms:
            view.stale.append(rid)
    entries = r.xrange(rk.USAGE_STREAM, "-", "+")
    view.stream_len = len(entries)
    events = [{_text(k): _text(v) for k, v in data.items()} for _sid, data in entries]
    ids = [e.get("request_id", "") for e in events]
    with Session(engine) as session:
        recorded = set(
            session.scalars(select(UsageEvent.request_id).where(UsageEvent.request_id.in_(ids)))
        )
    for e in events:
        if e.get("request_id") in recorded or "account_id" not in e:
            continue
        account_id = int(e["account_id"])
        view.undrained_cost[account_id] += int(e.get("cost_nusd") or 0)
        tokens = int(e.get("prompt_tokens") or 0) + int(e.get("completion_tokens") or 0)
        view.undrained_tokens[(account_id, e.get("usage_day", ""))] += tokens
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
            + view.undrained_tokens.get((account_id, yyyymmdd), 0)
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
    check.info.update(usage_rows=result.usage_rows, transfers=result.transfers)
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
        got = int(raw) if raw is not None else None
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
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
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


# --- the journal --------------------------------------------------------------------------

BOOK_ACCOUNTS = (
    ("customer:", ":credits", "Customer credits"),
    ("provider:", ":payable", "Provider payable"),
    ("provider:", ":payouts_pending", "Provider payouts in transit"),
    ("platform:revenue", "", "Platform revenue"),
    ("platform:promotional_grants", "", "Promotional credits"),
    ("platform:payment_clearing", "", "Stripe clearing"),
    ("platform:payment_losses", "", "Refund and dispute losses"),
)
JOURNAL_COLUMNS = ("date", "journal", "account", "debit", "credit", "memo")


def book_account(name: str) -> str:
    for prefix, suffix, book in BOOK_ACCOUNTS:
        if name.startswith(prefix) and name.endswith(suffix):
            if suffix or name == prefix:
                return book
    return name


def _cents_text(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _apportion(amounts: list[int], total_cents: int) -> list[int]:
    """Whole cents for nUSD `amounts` that add up to `total_cents` (largest remainders)."""
    floors = [a // NUSD_PER_CENT for a in amounts]
    extra = total_cents - sum(floors)
    order = sorted(range(len(amounts)), key=lambda i: amounts[i] % NUSD_PER_CENT, reverse=True)
    for i in order[: max(extra, 0)]:
        floors[i] += 1
    return floors


def journal_lines(engine: Engine, day: date) -> list[dict[str, str]]:
    """Day D's ledger movements by book account and transfer kind, one balanced journal."""
    start, end = _day_bounds(day)
    with Session(engine) as session:
        rows = session.execute(
            select(
                LedgerAccount.name,
                LedgerTransfer.kind,
                func.sum(LedgerEntry.amount),
                func.count(func.distinct(LedgerTransfer.id)),
            )
            .join(LedgerEntry, LedgerEntry.ledger_account_id == LedgerAccount.id)
            .join(LedgerTransfer, LedgerTransfer.id == LedgerEntry.transfer_id)
            .where(LedgerTransfer.event_at >= start, LedgerTransfer.event_at < end)
            .group_by(LedgerAccount.name, LedgerTransfer.kind)
        ).all()
    net: dict[tuple[str, str], int] = defaultdict(int)
    count: dict[tuple[str, str], int] = defaultdict(int)
    for name, kind, amount, n in rows:
        net[(book_account(name), kind)] += int(amount)
        count[(book_account(name), kind)] += int(n)
    keys = sorted(k for k, v in net.items() if v)
    debits = [k for k in keys if net[k] < 0]
    credits = [k for k in keys if net[k] > 0]
    total = sum(net[k] for k in credits)  # == -sum(debits): the ledger balances
    total_cents = (total + NUSD_PER_CENT // 2) // NUSD_PER_CENT
    cents = dict(zip(debits, _apportion([-net[k] for k in debits], total_cents), strict=True))
    cents.update(zip(credits, _apportion([net[k] for k in credits], total_cents), strict=True))
    lines = []
    for k in debits + credits:
        if not cents[k]:
            continue
        amount = _cents_text(cents[k])
        lines.append(
            {
                "date": day.isoformat(),
                "journal": f"DG-{day.strftime('%Y%m%d')}",
                "account": k[0],
                "debit": amount if net[k] < 0 else "",
                "credit": amount if net[k] > 0 else "",
                "memo": f"{k[1]} ({count[k]} transfers)",
            }
        )
    return lines


def write_journal(engine: Engine, out: TextIO, *, start: date, end: date | None = None) -> int:
    """Journals for the days in [start, end] (default: start only); returns lines written."""
    writer = csv.DictWriter(out, fieldnames=JOURNAL_COLUMNS)
    writer.writeheader()
    n = 0
    day = start
    while day <= (end or start):
        for line in journal_lines(engine, day):
            writer.writerow(line)
            n += 1
        day += timedelta(days=1)
    return n
