"""Read-side reports: a credits summary, usage grouped by day / model / customer, and CSV
export. The ledger's verification is billing.verify's."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TextIO, TypeVarTuple

from sqlalchemy import Engine, Select, func, select
from sqlalchemy.orm import Session

from billing import csv_cells, ledger
from billing import redis_state as rs
from billing.admission import utc_day
from billing.plans import Plans, daily_cap
from core.schema import Account, AccountLimits, UsageEvent
from kernel import redis_keys as rk
from kernel.money import nusd_to_usd
from kernel.usage_event import iso_day

if TYPE_CHECKING:
    import redis

GroupBy = Literal["day", "model", "customer"]
_Row = TypeVarTuple("_Row")  # a query's column types, kept by UsageFilter.where


@dataclass(frozen=True)
class CreditsSummary:
    account_id: int
    plan: str
    balance_nusd: int  # settled credits (SQL ledger)
    available_nusd: int | None  # minus open reservations and undrained usage (Redis)
    tokens_used_today: int
    tokens_per_day: int | None  # None: no daily cap
    resets_at: str  # next 00:00 UTC, ISO 8601

    @property
    def balance_usd(self) -> str:
        return nusd_to_usd(self.balance_nusd)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "balance_usd": self.balance_usd}


def credits_summary(
    engine: Engine,
    r: redis.Redis | None,
    plans: Plans,
    account_id: int,
    *,
    now: float | None = None,
) -> CreditsSummary:
    now = time.time() if now is None else now
    day, day_end_ms = utc_day(now)
    sql_day = iso_day(day)
    with Session(engine) as session:
        account = session.get(Account, account_id)
        if account is None:
            raise KeyError(f"no account {account_id}")
        limits = session.get(AccountLimits, account_id)
        balance = ledger.balance(session, ledger.customer_credits(account_id))
        used_sql = session.scalar(
            select(
                func.coalesce(func.sum(UsageEvent.prompt_tokens + UsageEvent.completion_tokens), 0)
            ).where(UsageEvent.account_id == account_id, UsageEvent.usage_day == sql_day)
        )
        plan = account.plan
    cap = daily_cap(
        plans.plans[plan].tokens_per_day if plan in plans.plans else None,
        limits.tokens_per_day if limits else None,
        limits.own_tokens_per_day if limits else None,
    )
    available = None
    used = int(used_sql or 0)
    if r is not None and rs.is_ready(r):
        bal_raw, day_raw = r.mget(rk.balance(account_id), rk.day(account_id, day))
        available = int(bal_raw or 0)
        used = int(day_raw or 0)
    resets = datetime.fromtimestamp(day_end_ms / 1000, UTC).isoformat().replace("+00:00", "Z")
    return CreditsSummary(account_id, plan, balance, available, used, cap, resets)


@dataclass(frozen=True)
class UsageRow:
    group: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_nusd: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "total_tokens": self.total_tokens,
            "cost_usd": nusd_to_usd(self.cost_nusd),
        }


def _ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def usage_report(
    engine: Engine,
    *,
    start: datetime,
    end: datetime,
    group_by: GroupBy = "day",
    account_id: int | None = None,
) -> list[UsageRow]:
    """Usage with its reservation time in [start, end), grouped; naive datetimes are UTC."""
    column = {
        "day": UsageEvent.usage_day,
        "model": UsageEvent.model,
        "customer": UsageEvent.customer_tag,
    }[group_by]
    totals = select(
        column,
        func.count(),
        func.sum(UsageEvent.prompt_tokens),
        func.sum(UsageEvent.completion_tokens),
        func.sum(UsageEvent.cost_nusd),
    )
    query = UsageFilter(start, end, account_id).where(totals).group_by(column).order_by(column)
    with Session(engine) as session:
        return [
            UsageRow(group, int(n), int(p or 0), int(c or 0), int(cost or 0))
            for group, n, p, c, cost in session.execute(query)
        ]


EXPORT_COLUMNS = (
    "request_id",
    "created_at",
    "settled_at",
    "account_id",
    "key_id",
    "customer_tag",
    "model",
    "provider_id",
    "prompt_tokens",
    "completion_tokens",
    "input_nusd_per_token",
    "output_nusd_per_token",
    "cost_nusd",
    "provider_share_nusd",
    "platform_share_nusd",
    "outcome",
    "row_hash",
)


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class UsageFilter:
    """Which usage events: reserved in [start, end) (naive datetimes are UTC), optionally of
    one account, model and customer tag."""

    start: datetime
    end: datetime
    account_id: int | None = None
    model: str | None = None
    customer_tag: str | None = None

    def where(self, query: Select[*_Row]) -> Select[*_Row]:
        query = query.where(
            UsageEvent.created_at_ms >= _ms(self.start), UsageEvent.created_at_ms < _ms(self.end)
        )
        if self.account_id is not None:
            query = query.where(UsageEvent.account_id == self.account_id)
        if self.model:
            query = query.where(UsageEvent.model == self.model)
        if self.customer_tag:
            query = query.where(UsageEvent.customer_tag == self.customer_tag)
        return query


def export_usage_csv(
    engine: Engine,
    out: TextIO,
    *,
    start: datetime,
    end: datetime,
    account_id: int | None = None,
    model: str | None = None,
    customer_tag: str | None = None,
) -> int:
    """One CSV row per request reserved in [start, end); returns the number of rows."""
    writer = csv_cells.Writer(out)
    writer.writerow(EXPORT_COLUMNS)
    chosen = UsageFilter(start, end, account_id, model, customer_tag)
    query = chosen.where(select(UsageEvent)).order_by(UsageEvent.id)
    n = 0
    with Session(engine) as session:
        for row in session.scalars(query.execution_options(yield_per=1000)):
            writer.writerow(_export_row(row))
            n += 1
    return n


def _export_row(row: UsageEvent) -> list[Any]:
    values = {c: getattr(row, c, None) for c in EXPORT_COLUMNS}
    values["created_at"] = _iso_ms(row.created_at_ms)
    values["settled_at"] = _iso_ms(row.settled_at_ms)
    return ["" if values[c] is None else values[c] for c in EXPORT_COLUMNS]


@dataclass(frozen=True)
class UsageEventRow:
    """One request of the usage ledger, as an account sees it."""

    request_id: str
    created_at: str
    model: str
    customer_tag: str | None
    key_id: int | None
    provider_id: str
    prompt_tokens: int
    completion_tokens: int
    cost_nusd: int
    outcome: str

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_events(
    engine: Engine, chosen: UsageFilter, *, offset: int = 0, limit: int = 50
) -> tuple[list[UsageEventRow], int]:
    """A page of the chosen usage events, newest first, and how many there are in all."""
    query = chosen.where(select(UsageEvent)).order_by(UsageEvent.id.desc())
    with Session(engine) as session:
        total = session.scalar(chosen.where(select(func.count()).select_from(UsageEvent)))
        rows = [
            UsageEventRow(
                request_id=e.request_id,
                created_at=_iso_ms(e.created_at_ms),
                model=e.model,
                customer_tag=e.customer_tag,
                key_id=e.key_id,
                provider_id=e.provider_id,
                prompt_tokens=e.prompt_tokens,
                completion_tokens=e.completion_tokens,
                cost_nusd=e.cost_nusd,
                outcome=e.outcome,
            )
            for e in session.scalars(query.offset(offset).limit(limit))
        ]
    return rows, int(total or 0)
