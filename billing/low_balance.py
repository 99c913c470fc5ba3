"""The low-balance email: a customer sets a threshold in the console
(`accounts.low_balance_nusd`); when its credits fall below it, one email says so, and the
next only after the balance has been back at or above the threshold (once per crossing).

The billing actor checks every account with a threshold periodically (`check`, from a
thread of `billing.loop.BillingLoop`). The balance read is Redis's (what admission spends
from, holds of requests in flight already taken out), else the ledger's. An alert is
claimed in SQL before the mail is sent (`low_balance_notified_at` set only where it was
unset, so two checkers never both send); a mail that fails is unclaimed and tried on the
next check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from billing import ledger, mail
from core.schema import Account, AccountStatus, utcnow
from kernel import redis_keys as rk
from kernel.money import nusd_to_usd

if TYPE_CHECKING:
    import redis

    from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckReport:
    checked: int
    sent: int
    rearmed: int


def _balance(session: Session, r: redis.Redis | None, account_id: int) -> int:
    if r is not None:
        found = r.get(rk.balance(account_id))
        if found is not None:
            return int(found)
    return ledger.balance(session, ledger.customer_credits(account_id))


def _usd(nusd: int) -> str:
    whole, _, frac = nusd_to_usd(nusd).partition(".")
    return f"${whole}.{frac.ljust(2, '0')[:2]}"


def check(engine: Engine, r: redis.Redis | None, settings: Settings) -> CheckReport:
    """Mail every account whose credits fell below its threshold since its last alert, and
    re-arm those back at or above it. Without SMTP nothing is sent (nor claimed)."""
    if not mail.enabled(settings):
        return CheckReport(0, 0, 0)
    with Session(engine) as session:
        rows = session.execute(
            select(Account.id, Account.email, Account.low_balance_nusd,
                   Account.low_balance_notified_at).where(
                Account.low_balance_nusd.is_not(None),
                Account.deleted_at.is_(None),
                Account.status == AccountStatus.active.value,
            )
        ).all()  # fmt: skip
        balances = {row[0]: _balance(session, r, row[0]) for row in rows}
    sent = rearmed = 0
    for account_id, email, threshold, notified in rows:
        if threshold is None:  # turned off since the read
            continue
        below = balances[account_id] < threshold
        if not below and notified is not None:
            _set_notified(engine, account_id, notified=False)
            rearmed += 1
        elif below and notified is None and _set_notified(engine, account_id, notified=True):
            try:
                _send(settings, email, balances[account_id], threshold)
            except Exception:
                log.exception("low-balance mail to account %d not sent; next check retries",
                              account_id)  # fmt: skip
                _set_notified(engine, account_id, notified=False)
                continue
            sent += 1
    return CheckReport(len(rows), sent, rearmed)


def _set_notified(engine: Engine, account_id: int, *, notified: bool) -> bool:
    """Claim (or release) the account's alert: True when this call changed it."""
    where = Account.low_balance_notified_at.is_(None) if notified else (
        Account.low_balance_notified_at.is_not(None)
    )  # fmt: skip
    with Session(engine) as session, session.begin():
        result = session.execute(
            update(Account)
            .where(Account.id == account_id, where)
            .values(low_balance_notified_at=utcnow() if notified else None)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def _send(settings: Settings, email: str, balance: int, threshold: int) -> None:
    mail.send(
        settings,
        to=email,
        subject="Your DarkGPU credits are running low",
        body=f"Your DarkGPU credit balance is {_usd(balance)}, below the {_usd(threshold)} "
        "you asked to be told about.\n\nRequests are refused (402) once the credits run out. "
        f"Buy more on the billing page:\n\n{mail.public_link(settings, '/console/billing')}\n\n"
        "You get this message once each time the balance falls below your threshold; change "
        f"or turn it off on your account page: {mail.public_link(settings, '/console/account')}"
        "\n",
    )
