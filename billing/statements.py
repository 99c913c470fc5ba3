"""Weekly earnings statements for a provider's owner: for each ISO week (Monday 00:00 UTC to
the next), what each of its GPUs served and earned, from the usage ledger (the provider's
95% share of every request, `billing.earnings`), and the payout made for that week, if any
(`payouts`). The weeks are the ones payouts use (`billing.payouts.IsoWeek`), so a statement
and its payout speak of the same requests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from billing import earnings
from billing.payouts import IsoWeek
from core.schema import Payout

DEFAULT_WEEKS = 8


@dataclass
class StatementLine:
    """One GPU's week."""

    provider_id: str
    requests: int = 0
    tokens: int = 0
    earned_nusd: int = 0


@dataclass
class WeeklyStatement:
    week: str
    start: date
    end: date  # the last day of the week
    lines: list[StatementLine] = field(default_factory=list)
    paid_cents: int = 0  # payouts for the week that did not fail
    payout_status: str | None = None  # the week's payouts' statuses, or None

    @property
    def requests(self) -> int:
        return sum(line.requests for line in self.lines)

    @property
    def tokens(self) -> int:
        return sum(line.tokens for line in self.lines)

    @property
    def earned_nusd(self) -> int:
        return sum(line.earned_nusd for line in self.lines)


def weekly_statements(
    engine: Engine, provider_ids: Iterable[str], *, now: datetime, weeks: int = DEFAULT_WEEKS
) -> list[WeeklyStatement]:
    """The last `weeks` ISO weeks up to the one holding `now`, newest first (the current
    week is partial), for the given providers (the caller's own)."""
    ids = sorted(set(provider_ids))
    current = IsoWeek.of(now)
    first = IsoWeek.of(current.start - timedelta(weeks=weeks - 1))
    statements: dict[str, WeeklyStatement] = {}
    week = first
    while week.start <= current.start:
        statements[str(week)] = WeeklyStatement(
            str(week), week.start.date(), (week.end - timedelta(days=1)).date()
        )
        week = IsoWeek.of(week.end)
    if not ids:
        return list(statements.values())[::-1]
    rows = earnings.earnings(engine, ids, start=first.start.date(), end=current.end.date())
    lines: dict[tuple[str, str], StatementLine] = {}
    for row in rows:
        name = str(IsoWeek.of(datetime.fromisoformat(row.day + "T00:00:00+00:00")))
        line = lines.get((name, row.provider_id))
        if line is None:
            line = lines[(name, row.provider_id)] = StatementLine(row.provider_id)
            statements[name].lines.append(line)
        line.requests += row.requests
        line.tokens += row.prompt_tokens + row.completion_tokens
        line.earned_nusd += row.earned_nusd
    with Session(engine) as session:
        payouts = session.scalars(
            select(Payout).where(Payout.provider_id.in_(ids), Payout.week.in_(list(statements)))
        ).all()
    for payout in payouts:
        statement = statements[payout.week]
        if payout.status != "failed":
            statement.paid_cents += payout.amount_cents
        seen = set((statement.payout_status or "").split(", ")) - {""}
        statement.payout_status = ", ".join(sorted(seen | {payout.status}))
    return list(statements.values())[::-1]
