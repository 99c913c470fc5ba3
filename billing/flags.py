"""Account flags: something an operator must look at before the account's providers are paid.

A webhook opens one (billing.webhooks) when a refund or dispute finds the credits already
spent, or while a dispute is open (the dispute's close resolves that one itself). While any
flag of an account is open its providers are not paid (billing.payouts). An operator lists
them (`darkgpu admin account flags`) and resolves one once it is dealt with
(`darkgpu admin account resolve-flag`); a flag is never deleted, so the record stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from core.schema import AccountFlag, utcnow
from kernel.errors import Conflict, NotFound

_WORDS = {
    "dispute_open": "an open dispute",
    "refund_after_spend": "a refund of credits it had spent",
    "dispute_after_spend": "a dispute of credits it had spent",
}


def words(reason: str) -> str:
    return _WORDS.get(reason, f"an open {reason.replace('_', ' ')}")


@dataclass(frozen=True)
class Flag:
    id: int
    account_id: int
    reason: str
    stripe_id: str
    unrecovered_nusd: int
    created_at: datetime
    resolved_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "account_id": self.account_id,
            "reason": self.reason,
            "says": words(self.reason),
            "stripe_id": self.stripe_id,
            "unrecovered_nusd": self.unrecovered_nusd,
            "created_at": self.created_at.isoformat(),
            "resolved_at": self.resolved_at.isoformat() if self.resolved_at else None,
        }


def _flag(row: AccountFlag) -> Flag:
    return Flag(row.id, row.account_id, row.reason, row.stripe_id, row.unrecovered_nusd,
                row.created_at, row.resolved_at)  # fmt: skip


def holds(session: Session, account_id: int) -> list[str]:
    """Why the account's providers may not be paid now: each open flag's reason, in words."""
    reasons = session.scalars(
        select(AccountFlag.reason)
        .where(AccountFlag.account_id == account_id, AccountFlag.resolved_at.is_(None))
        .order_by(AccountFlag.id)
    ).all()
    return [words(r) for r in dict.fromkeys(reasons)]


def list_flags(engine: Engine, *, account_id: int | None = None, all_: bool = False) -> list[Flag]:
    """Open flags (every flag with `all_`), of one account or of all, oldest first."""
    query = select(AccountFlag).order_by(AccountFlag.id)
    if account_id is not None:
        query = query.where(AccountFlag.account_id == account_id)
    if not all_:
        query = query.where(AccountFlag.resolved_at.is_(None))
    with Session(engine) as session:
        return [_flag(row) for row in session.scalars(query)]


def resolve(engine: Engine, flag_id: int) -> Flag:
    """Mark one flag dealt with: the account's providers are paid again once none is open."""
    with Session(engine) as session, session.begin():
        row = session.get(AccountFlag, flag_id, with_for_update=True)
        if row is None:
            raise NotFound(f"no account flag {flag_id}")
        if row.resolved_at is not None:
            raise Conflict(f"account flag {flag_id} was resolved at {row.resolved_at.isoformat()}")
        row.resolved_at = utcnow()
        session.flush()
        return _flag(row)
