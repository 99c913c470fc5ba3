"""The ledger as QuickBooks Online journal entries (`darkgpu admin journal export`).

QuickBooks Online's journal-entry import (Settings → Import data → Journal entries) reads a
CSV with the columns of its sample file: `JournalNo, JournalDate, AccountName, Debits, Credits,
Description, Name`. Its rules: the lines sharing a JournalNo form one entry, which must
balance; JournalDate is MM/DD/YYYY; AccountName must name an account of the company's chart of
accounts exactly (account numbers turned off; a sub-account as `Parent:Sub`); a line carries a
debit or a credit, not both; a journal number has at most 21 characters; `Name` (a customer or
vendor of the company) is needed only on Accounts Receivable / Payable lines, which this chart
does not use, so it is left empty.

The export writes one entry per UTC day per pair of ledger accounts that money moved between
that day (e.g. `customer:17:credits` → `provider:prv_a:payable` for usage): two lines, the
account debited and the account credited, each named by its book account (`CHART`, the
accounts to create in QuickBooks once) with both ledger accounts and the transfer kinds in the
Description. Money moving both ways between a pair on one day is netted.

Rounding (nano-dollars to cents): per pair of ledger accounts, the running total of what moved
since the ledger began is rounded half up to the cent, and a day's entry is the change of
that rounded running total. Both lines of an entry carry the same cents, so every entry
balances; a pair's entries over any period add up to its exact movement to within half a
cent; and exports of consecutive periods add up to one export of the whole period.

A transfer's legs are recovered from its entries: each transfer debits one account and credits
one or more (usage), or debits several and credits one (a refund's claw-back and loss), so
its legs are exact; a transfer of several accounts on both sides (none is posted today) is
refused rather than split by guesswork.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TextIO

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from billing import csv_cells
from core.schema import LedgerAccount, LedgerEntry, LedgerTransfer
from kernel.errors import InternalError
from kernel.money import NUSD_PER_CENT

COLUMNS = ("JournalNo", "JournalDate", "AccountName", "Debits", "Credits", "Description", "Name")
DATE_FORMAT = "%m/%d/%Y"
MAX_JOURNAL_NO = 21
MAX_DESCRIPTION = 4000

# ledger account name (prefix, suffix) → the QuickBooks account, and its type there
CHART: tuple[tuple[str, str, str, str], ...] = (
    ("customer:", ":credits", "Customer credits", "Other Current Liabilities"),
    ("provider:", ":payable", "Provider payable", "Other Current Liabilities"),
    ("provider:", ":payouts_pending", "Provider payouts in transit", "Other Current Liabilities"),
    ("platform:revenue", "", "Platform revenue", "Income"),
    ("platform:promotional_grants", "", "Promotional credits", "Expenses"),
    ("platform:payment_clearing", "", "Stripe clearing", "Bank"),
    ("platform:payment_losses", "", "Refund and dispute losses", "Expenses"),
    ("platform:payment_fees", "", "Stripe fees", "Expenses"),
)
BOOK_ACCOUNTS = frozenset(book for _p, _s, book, _t in CHART)


class JournalError(InternalError):
    """The ledger holds something the export cannot write faithfully."""


def book_account(name: str) -> str:
    """The QuickBooks account a ledger account is booked to."""
    for prefix, suffix, book, _type in CHART:
        if suffix and name.startswith(prefix) and name.endswith(suffix):
            return book
        if not suffix and name == prefix:
            return book
    raise JournalError(f"ledger account {name!r} has no account in the QuickBooks chart")


def _round_half_up(nusd: int) -> int:
    """Cents, rounded half up (away from zero for negatives: symmetric)."""
    sign = -1 if nusd < 0 else 1
    return sign * ((abs(nusd) + NUSD_PER_CENT // 2) // NUSD_PER_CENT)


def _legs(entries: list[tuple[str, int]]) -> list[tuple[str, str, int]]:
    """(debited, credited, nUSD) legs of one transfer from its signed entries (an account
    may have an entry per leg: they are netted first)."""
    net: dict[str, int] = defaultdict(int)
    for name, amount in entries:
        net[name] += amount
    debits = sorted((name, -amount) for name, amount in net.items() if amount < 0)
    credits = sorted((name, amount) for name, amount in net.items() if amount > 0)
    if len(debits) == 1:
        return [(debits[0][0], name, amount) for name, amount in credits]
    if len(credits) == 1:
        return [(name, credits[0][0], amount) for name, amount in debits]
    raise JournalError(
        "a transfer debits and credits several accounts: "
        + ", ".join(f"{n} {a}" for n, a in entries)
    )


@dataclass
class _PairDay:
    nusd: int = 0  # signed: from the pair's first account to its second
    kinds: dict[str, int] | None = None


@dataclass(frozen=True)
class Entry:
    """One journal entry: `cents` from `debit` to `credit` on `day`."""

    number: str
    day: date
    debit: str  # ledger account names
    credit: str
    cents: int
    description: str


def _day_bounds(start: date, end: date) -> tuple[datetime, datetime]:
    return (
        datetime(start.year, start.month, start.day, tzinfo=UTC),
        datetime(end.year, end.month, end.day, tzinfo=UTC) + timedelta(days=1),
    )


Entries = list[tuple[str, int]]


def _transfers(session: Session, until: datetime) -> Iterator[tuple[datetime, str, Entries]]:
    """(event_at, kind, [(ledger account, amount)]) of every transfer before `until`."""
    rows = session.execute(
        select(
            LedgerTransfer.id,
            LedgerTransfer.event_at,
            LedgerTransfer.kind,
            LedgerAccount.name,
            LedgerEntry.amount,
        )
        .join(LedgerEntry, LedgerEntry.transfer_id == LedgerTransfer.id)
        .join(LedgerAccount, LedgerAccount.id == LedgerEntry.ledger_account_id)
        .where(LedgerTransfer.event_at < until)
        .order_by(LedgerTransfer.id)
        .execution_options(yield_per=5000)
    )
    current: int | None = None
    when, kind = datetime.min, ""
    entries: Entries = []
    for transfer_id, event_at, transfer_kind, name, amount in rows:
        if transfer_id != current:
            if current is not None:
                yield when, kind, entries
            current, when, kind, entries = transfer_id, event_at, transfer_kind, []
        entries.append((name, int(amount)))
    if current is not None:
        yield when, kind, entries


def _utc_day(moment: datetime) -> date:
    if moment.tzinfo is None:  # SQLite hands back naive UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).date()


def entries(engine: Engine, start: date, end: date) -> list[Entry]:
    """The journal entries of the UTC days start..end (inclusive), in date and pair order."""
    if end < start:
        raise ValueError(f"the period ends ({end}) before it starts ({start})")
    first, until = _day_bounds(start, end)
    before: dict[tuple[str, str], int] = defaultdict(int)
    days: dict[tuple[date, tuple[str, str]], _PairDay] = {}
    with Session(engine) as session:
        for when, kind, legs in _transfers(session, until):
            day = _utc_day(when)
            for debit, credit, nusd in _legs(legs):
                pair, signed = (
                    ((debit, credit), nusd) if debit < credit else ((credit, debit), -nusd)
                )
                if day < start:
                    before[pair] += signed
                    continue
                slot = days.setdefault((day, pair), _PairDay(kinds={}))
                slot.nusd += signed
                assert slot.kinds is not None
                slot.kinds[kind] = slot.kinds.get(kind, 0) + 1
    running = dict(before)
    out: list[Entry] = []
    numbers: dict[date, int] = defaultdict(int)
    for (day, pair), slot in sorted(days.items()):
        was = running.get(pair, 0)
        running[pair] = was + slot.nusd
        cents = _round_half_up(running[pair]) - _round_half_up(was)
        if cents == 0:
            continue
        debit, credit = pair if cents > 0 else (pair[1], pair[0])
        numbers[day] += 1
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted((slot.kinds or {}).items()))
        out.append(
            Entry(
                number=f"DG{day.strftime('%Y%m%d')}-{numbers[day]:04d}",
                day=day,
                debit=debit,
                credit=credit,
                cents=abs(cents),
                description=_text(f"{debit} to {credit}: {kinds}"),
            )
        )
    return out


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _text(value: str) -> str:
    """A Description QuickBooks accepts: one line, at most its length."""
    return _CONTROL.sub(" ", value)[:MAX_DESCRIPTION]


def cents_text(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def write(engine: Engine, out: TextIO, *, start: date, end: date | None = None) -> int:
    """Write the QuickBooks import CSV for start..end (default: start only); returns the
    number of entries (each two lines)."""
    made = entries(engine, start, end or start)
    writer = csv_cells.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for entry in made:
        amount = cents_text(entry.cents)
        for account, debit in ((entry.debit, True), (entry.credit, False)):
            writer.writerow(
                {
                    "JournalNo": entry.number,
                    "JournalDate": entry.day.strftime(DATE_FORMAT),
                    "AccountName": book_account(account),
                    "Debits": amount if debit else "",
                    "Credits": "" if debit else amount,
                    "Description": entry.description,
                    "Name": "",
                }
            )
    return len(made)
