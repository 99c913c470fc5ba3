"""`darkgpu admin ledger verify`: the usage hash chain is intact, the double-entry ledger
sums to zero, and every paid request was charged exactly once, for its cost."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from billing import chain, ledger
from core.schema import LedgerAccount, LedgerEntry, LedgerTransfer, UsageEvent
from kernel.usage_event import UsageRecord


@dataclass
class VerifyResult:
    usage_rows: int = 0
    transfers: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "usage_rows": self.usage_rows,
            "transfers": self.transfers,
            "problems": self.problems,
        }


def _usage_rows(session: Session) -> Iterator[UsageEvent]:
    yield from session.scalars(
        select(UsageEvent).order_by(UsageEvent.id).execution_options(yield_per=1000)
    )


def verify_ledger(engine: Engine, *, max_problems: int = 100) -> VerifyResult:
    result = VerifyResult()

    def problem(text: str) -> None:
        if len(result.problems) < max_problems:
            result.problems.append(text)

    with Session(engine) as session:
        # 1. the usage hash chain, and each row's own arithmetic
        prev = chain.GENESIS
        costs: dict[str, int] = {}
        for row in _usage_rows(session):
            result.usage_rows += 1
            record = UsageRecord.of(row)
            if row.prev_hash != prev:
                problem(f"usage row {row.id} ({row.request_id}): chain broken (prev_hash)")
            if chain.row_hash(row.prev_hash, record) != row.row_hash:
                problem(f"usage row {row.id} ({row.request_id}): row_hash does not match")
            money = record.money_problem()
            if money is not None:
                problem(f"usage row {row.id} ({row.request_id}): {money}")
            if row.cost_nusd:
                costs[f"usage:{row.request_id}"] = row.cost_nusd
            prev = row.row_hash

        # 2. double entry: every transfer and the whole ledger sum to zero
        result.transfers = session.scalar(select(func.count()).select_from(LedgerTransfer)) or 0
        total = ledger.entries_sum(session)
        if total != 0:
            problem(f"ledger entries sum to {total}, not 0")
        unbalanced = session.execute(
            select(LedgerEntry.transfer_id, func.sum(LedgerEntry.amount))
            .group_by(LedgerEntry.transfer_id)
            .having(func.sum(LedgerEntry.amount) != 0)
        ).all()
        for transfer_id, amount in unbalanced:
            problem(f"transfer {transfer_id}: entries sum to {amount}")
        empty = session.scalars(
            select(LedgerTransfer.id).where(
                ~select(LedgerEntry.id).where(LedgerEntry.transfer_id == LedgerTransfer.id).exists()
            )
        ).all()
        for transfer_id in empty:
            problem(f"transfer {transfer_id} has no entries")
        sums = dict(
            session.execute(
                select(LedgerEntry.ledger_account_id, func.sum(LedgerEntry.amount)).group_by(
                    LedgerEntry.ledger_account_id
                )
            ).all()
        )
        for acct in session.scalars(select(LedgerAccount)):
            if acct.balance != int(sums.get(acct.id) or 0):
                problem(
                    f"ledger account {acct.name}: balance {acct.balance} != entries "
                    f"{int(sums.get(acct.id) or 0)}"
                )
            if acct.balance < 0 and not acct.allow_negative:
                problem(f"ledger account {acct.name} is negative")

        # 3. every paid request was charged exactly once, for its cost
        charged = dict(
            session.execute(
                select(LedgerTransfer.idempotency_key, func.sum(LedgerEntry.amount))
                .join(LedgerEntry, LedgerEntry.transfer_id == LedgerTransfer.id)
                .join(LedgerAccount, LedgerAccount.id == LedgerEntry.ledger_account_id)
                .where(LedgerTransfer.kind == "usage", LedgerAccount.kind == "customer_credits")
                .group_by(LedgerTransfer.idempotency_key)
            ).all()
        )
        for key, cost in costs.items():
            if -int(charged.get(key) or 0) != cost:
                problem(f"{key}: ledger charged {-int(charged.get(key) or 0)}, usage says {cost}")
        for key in charged.keys() - costs.keys():
            problem(f"{key}: a usage transfer without a usage row")
    return result
