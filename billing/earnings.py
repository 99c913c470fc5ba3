"""Provider earnings, from the usage ledger and the provider payable accounts.

Each settled request credits its provider's share (95%, `usage_events.provider_share_nusd`)
to `provider:<id>:payable`, keyed by the provider id the request was served by (the node's
`darkgpu.io/provider-id` label, `providers.id`). Earnings are grouped by the request's UTC
day (the reservation's, as in usage reports) and model.

`totals` is a provider's own summary (what its agent sees: `GET /v1/providers/me`).

`due_for_week` is what a payout for the week ending at `week_end` may pay: the payable
balance now, less what was earned after the week ended (payouts in flight are already out of
the payable account, and failed ones are back in it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from billing import ledger
from core.schema import LedgerAccount, LedgerEntry, LedgerKind, LedgerTransfer, UsageEvent
from kernel.money import nusd_to_usd

PAYOUT_KINDS = ("payout_pending", "payout_void", "payout_post")


def payouts_pending(provider_id: str) -> ledger.AccountSpec:
    """Where a payout's money waits while its Stripe transfer is in flight."""
    return ledger.AccountSpec(
        f"provider:{provider_id}:payouts_pending",
        LedgerKind.provider_payable,
        False,
        provider_id=provider_id,
    )


@dataclass(frozen=True)
class EarningsRow:
    day: str
    provider_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    earned_nusd: int

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "earned_usd": nusd_to_usd(self.earned_nusd)}


@dataclass(frozen=True)
class EarningsTotal:
    requests: int
    earned_nusd: int  # the provider's share of everything it served
    payable_nusd: int  # not paid out yet (the ledger's `provider:<id>:payable`)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def totals(engine: Engine, provider_id: str) -> EarningsTotal:
    """What the provider's GPU has earned since it joined, and what is still to be paid."""
    earned = func.coalesce(func.sum(UsageEvent.provider_share_nusd), 0)
    with Session(engine) as session:
        requests, earned_nusd = session.execute(
            select(func.count(UsageEvent.id), earned).where(UsageEvent.provider_id == provider_id)
        ).one()
        payable = payable_balances(session, [provider_id])[provider_id]
    return EarningsTotal(int(requests), int(earned_nusd), payable)


def earnings(
    engine: Engine, provider_ids: Iterable[str], *, start: date, end: date
) -> list[EarningsRow]:
    """The providers' share by UTC day and model, for days in [start, end)."""
    ids = sorted(set(provider_ids))
    if not ids:
        return []
    query = (
        select(
            UsageEvent.usage_day,
            UsageEvent.provider_id,
            UsageEvent.model,
            func.count(),
            func.sum(UsageEvent.prompt_tokens),
            func.sum(UsageEvent.completion_tokens),
            func.sum(UsageEvent.provider_share_nusd),
        )
        .where(
            UsageEvent.provider_id.in_(ids),
            UsageEvent.usage_day >= start.isoformat(),
            UsageEvent.usage_day < end.isoformat(),
        )
        .group_by(UsageEvent.usage_day, UsageEvent.provider_id, UsageEvent.model)
        .order_by(UsageEvent.usage_day, UsageEvent.provider_id, UsageEvent.model)
    )
    with Session(engine) as session:
        return [
            EarningsRow(day, pid, model, int(n), int(p or 0), int(c or 0), int(share or 0))
            for day, pid, model, n, p, c, share in session.execute(query)
        ]


def payable_balances(session: Session, provider_ids: Iterable[str]) -> dict[str, int]:
    """provider id → payable balance (earned, not paid out or in flight), nUSD."""
    ids = list(provider_ids)
    names = {ledger.provider_payable(pid).name: pid for pid in ids}
    found = dict(
        session.execute(
            select(LedgerAccount.name, LedgerAccount.balance).where(
                LedgerAccount.name.in_(list(names))
            )
        ).all()
    )
    return {pid: int(found.get(name) or 0) for name, pid in names.items()}


def payable_provider_ids(session: Session) -> list[str]:
    """Every provider id that has a payable account."""
    rows = session.scalars(
        select(LedgerAccount.provider_id).where(
            LedgerAccount.kind == LedgerKind.provider_payable.value,
            LedgerAccount.name.like("provider:%:payable"),
        )
    )
    return sorted({pid for pid in rows if pid})


def due_for_week(session: Session, provider_id: str, week_end: datetime) -> int:
    """nUSD payable for the weeks ending at `week_end` (never negative)."""
    name = ledger.provider_payable(provider_id).name
    found = session.execute(
        select(LedgerAccount.id, LedgerAccount.balance).where(LedgerAccount.name == name)
    ).one_or_none()
    if found is None:
        return 0
    account_id, balance = found
    # the account's id as a constant, not a join on its name: the planner then knows how
    # many entries the account has and reads the transfers since `week_end` by their moment
    # (ix_ledger_transfers_event_at) instead of every entry of the account (issue 13)
    later = session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount), 0))
        .join(LedgerTransfer, LedgerTransfer.id == LedgerEntry.transfer_id)
        .where(
            LedgerEntry.ledger_account_id == account_id,
            LedgerTransfer.event_at >= week_end,
            LedgerTransfer.kind.not_in(PAYOUT_KINDS),
        )
    )
    return max(balance - int(later or 0), 0)
