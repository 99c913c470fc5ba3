"""The QuickBooks Online journal export (issue 14), round-tripped through the import's rules:
each JournalNo balances, dates are MM/DD/YYYY, account names are the chart's and name the
ledger accounts the Description gives, and the totals are the ledger's for the period."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from billing import accounts, fees, journal, ledger
from billing.admission import Admission
from billing.cli import app
from billing.meter import UsageMeter
from billing.plans import Plans
from core.schema import LedgerAccount, LedgerEntry, LedgerTransfer
from kernel.money import NUSD_PER_CENT as CENT
from tests.billing.conftest import REDIS_URL, REPO, USD
from tests.billing.payments_harness import Harness
from tests.billing.test_reconcile import request

TODAY = datetime.now(UTC).date()
DAYS = [TODAY - timedelta(days=2), TODAY - timedelta(days=1), TODAY]
ODD = 1_234_567_891  # nUSD: not a whole number of cents


@dataclass
class Imported:
    """What QuickBooks would make of the file: entries by JournalNo, after its checks."""

    entries: dict[str, list[dict[str, str]]]

    def by_book(self) -> dict[str, int]:
        """Net debit cents per QuickBooks account."""
        net: dict[str, int] = defaultdict(int)
        for lines in self.entries.values():
            for line in lines:
                net[line["AccountName"]] += _cents(line["Debits"]) - _cents(line["Credits"])
        return dict(net)

    def by_pair(self) -> dict[tuple[date, str, str], int]:
        """Cents per (day, debited ledger account, credited ledger account)."""
        out = {}
        for lines in self.entries.values():
            debit, credit = _ledger_accounts(lines[0]["Description"])
            day = datetime.strptime(lines[0]["JournalDate"], "%m/%d/%Y").date()
            out[(day, debit, credit)] = _cents(lines[0]["Debits"] or lines[0]["Credits"])
        return out


def _cents(text: str) -> int:
    return int(Decimal(text) * 100) if text else 0


def _ledger_accounts(description: str) -> tuple[str, str]:
    found = re.fullmatch(r"(.+?) to (.+): (?:[a-z_]+ x\d+(?:, )?)+", description)
    assert found, description
    return found.group(1), found.group(2)


def qbo_import(text: str) -> Imported:
    """QuickBooks Online's journal-entry import rules, as its help pages state them."""
    rows = list(csv.reader(io.StringIO(text)))
    assert tuple(rows[0]) == journal.COLUMNS == (
        "JournalNo", "JournalDate", "AccountName", "Debits", "Credits", "Description", "Name",
    )  # fmt: skip
    entries: dict[str, list[dict[str, str]]] = defaultdict(list)
    for raw in rows[1:]:
        assert len(raw) == len(journal.COLUMNS), raw
        line = dict(zip(journal.COLUMNS, raw, strict=True))
        entries[line["JournalNo"]].append(line)
    for number, lines in entries.items():
        assert 0 < len(number) <= 21, number
        assert len({line["JournalDate"] for line in lines}) == 1, number
        assert re.fullmatch(r"\d{2}/\d{2}/\d{4}", lines[0]["JournalDate"])
        datetime.strptime(lines[0]["JournalDate"], "%m/%d/%Y")  # a real date
        debits = credits = 0
        for line in lines:
            amounts = [line["Debits"], line["Credits"]]
            assert sum(1 for a in amounts if a) == 1, line  # a debit or a credit, not both
            amount = next(a for a in amounts if a)
            assert re.fullmatch(r"\d+\.\d{2}", amount) and Decimal(amount) > 0, line
            assert line["AccountName"] in journal.BOOK_ACCOUNTS, line  # the chart's names
            assert line["Name"] == ""  # no A/R or A/P lines: no customer or vendor needed
            debits += _cents(line["Debits"])
            credits += _cents(line["Credits"])
        assert debits == credits, number  # each entry balances
        debit_line = next(line for line in lines if line["Debits"])
        credit_line = next(line for line in lines if line["Credits"])
        debit, credit = _ledger_accounts(debit_line["Description"])
        assert journal.book_account(debit) == debit_line["AccountName"]
        assert journal.book_account(credit) == credit_line["AccountName"]
    return Imported(dict(entries))


def export(engine: Engine, start: date, end: date) -> str:
    out = io.StringIO()
    journal.write(engine, out, start=start, end=end)
    return out.getvalue()


def ledger_net_debits(engine: Engine, start: date, end: date) -> dict[str, int]:
    """nUSD debited (net) per QuickBooks account in the period, straight from the entries."""
    first = datetime(start.year, start.month, start.day, tzinfo=UTC)
    until = datetime(end.year, end.month, end.day, tzinfo=UTC) + timedelta(days=1)
    with Session(engine) as session:
        rows = session.execute(
            select(LedgerAccount.name, func.sum(LedgerEntry.amount))
            .join(LedgerEntry, LedgerEntry.ledger_account_id == LedgerAccount.id)
            .join(LedgerTransfer, LedgerTransfer.id == LedgerEntry.transfer_id)
            .where(LedgerTransfer.event_at >= first, LedgerTransfer.event_at < until)
            .group_by(LedgerAccount.name)
        ).all()
    net: dict[str, int] = defaultdict(int)
    for name, amount in rows:
        net[journal.book_account(name)] -= int(amount)
    return dict(net)


@pytest.fixture
async def books(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> Harness:
    """Three days of business: a purchase (with Stripe's fee), usage at prices that are not
    whole cents, a refund, transfers dated on the two days before today."""
    h = Harness(engine, r, plans)
    customer = h.account()
    session_id = h.buy(customer, "team")
    accounts.set_limits(engine, r, account_id=customer, tokens_per_day=None)
    key = accounts.create_key(engine, r, account_id=customer).key
    assert key is not None
    for i in range(3):
        await request(admission, key, f"jr-{i}", 1_000_003 + i)
    meter.drain_all()
    h.deliver("charge.refunded", h.fake.refund(session_id, 1_234))
    credits = ledger.customer_credits(customer)
    with Session(engine) as session, session.begin():
        for n, day in enumerate(DAYS[:2]):
            for i in range(3):  # usage-shaped: one debit, two credits, odd amounts
                provider = ODD + 7 * i + n
                ledger.post_transfer(
                    session,
                    idempotency_key=f"usage:past-{day}-{i}",
                    kind="usage",
                    legs=[
                        ledger.Leg(credits, ledger.provider_payable("prv_a"), provider),
                        ledger.Leg(credits, ledger.PLATFORM_REVENUE, provider // 19 + 3),
                    ],
                    event_at=datetime(day.year, day.month, day.day, 12, i, tzinfo=UTC),
                )
    return h


def test_the_export_imports_balanced_and_matches_the_ledger(books: Harness) -> None:
    text = export(books.engine, DAYS[0], DAYS[-1])
    imported = qbo_import(text)
    pairs = imported.by_pair()
    assert {day for day, _d, _c in pairs} == set(DAYS)
    books_net = imported.by_book()
    exact = ledger_net_debits(books.engine, DAYS[0], DAYS[-1])
    assert set(books_net) == {k for k, v in exact.items() if v}
    for book, nusd in exact.items():
        # rounding: each pair's running total is rounded to the cent, so a book account's
        # total is within half a cent per pair that touches it
        touching = sum(1 for _day, d, c in pairs if book in (journal.book_account(d),
                                                             journal.book_account(c)))  # fmt: skip
        assert abs(books_net.get(book, 0) * CENT - nusd) <= touching * CENT // 2, book
    # money that moved in whole cents is exact: Stripe's clearing and fees
    assert books_net["Stripe clearing"] * CENT == exact["Stripe clearing"]
    fee = books.fake.fees_cents()
    assert books_net["Stripe fees"] == fee == 465
    assert sum(books_net.values()) == 0


def test_rounding_carries_from_day_to_day_and_periods_chain(books: Harness) -> None:
    whole = qbo_import(export(books.engine, DAYS[0], DAYS[-1])).by_pair()
    by_day: dict[tuple[date, str, str], int] = {}
    for day in DAYS:
        by_day.update(qbo_import(export(books.engine, day, day)).by_pair())
    assert by_day == whole  # exporting day by day gives the same entries as the period
    # the usage pair's days: each day rounds its running total, so the days add up to the
    # rounded total of the three days, not to the sum of three rounded days
    usage = ("customer", "provider:prv_a:payable")
    days = [v for (_day, d, c), v in sorted(whole.items()) if d.startswith(usage[0])
            and c == usage[1]]  # fmt: skip
    with Session(books.engine) as session:
        exact = -sum(
            int(a)
            for a in session.scalars(
                select(LedgerEntry.amount)
                .join(LedgerAccount, LedgerAccount.id == LedgerEntry.ledger_account_id)
                .where(LedgerAccount.name == "provider:prv_a:payable")
            )
        )
    assert sum(days) == (-exact + CENT // 2) // CENT
    assert len(days) == 3


def test_a_day_without_movements_exports_only_the_header(books: Harness) -> None:
    text = export(books.engine, TODAY - timedelta(days=9), TODAY - timedelta(days=8))
    assert text.strip() == ",".join(journal.COLUMNS)
    with pytest.raises(ValueError, match="before it starts"):
        journal.entries(books.engine, TODAY, TODAY - timedelta(days=1))


def test_hostile_text_stays_in_its_cell(books: Harness) -> None:
    """A provider id is chosen by the provider: a comma, a newline or a formula in it must
    neither break the file's rows nor run in a spreadsheet."""
    sneaky = 'prv_x,"\n=HYPERLINK("http://evil")'
    customer = books.account()
    with Session(books.engine) as session, session.begin():
        ledger.post_transfer(
            session,
            idempotency_key="usage:sneaky",
            kind="usage",
            legs=[
                ledger.Leg(ledger.customer_credits(customer), ledger.provider_payable(sneaky), USD)
            ],
        )
    imported = qbo_import(export(books.engine, TODAY, TODAY))
    [line] = [
        lines[0] for lines in imported.entries.values() if "HYPERLINK" in lines[0]["Description"]
    ]
    assert "\n" not in line["Description"] and line["AccountName"] == "Customer credits"


def test_what_the_chart_cannot_hold_is_refused(books: Harness) -> None:
    odd = ledger.AccountSpec("platform:mystery", fees.PAYMENT_FEES.kind, True)
    with Session(books.engine) as session, session.begin():
        ledger.post_transfer(
            session,
            idempotency_key="mystery",
            kind="adjustment",
            legs=[ledger.Leg(odd, ledger.PLATFORM_REVENUE, 10 * USD)],
        )
    with pytest.raises(journal.JournalError, match="platform:mystery"):
        export(books.engine, TODAY, TODAY)


def test_cli_journal_export(
    books: Harness, db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DARKGPU_DATABASE_URL", db_url)
    monkeypatch.setenv("DARKGPU_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("DARKGPU_PLANS_FILE", str(REPO / "configs" / "plans.toml"))
    runner = CliRunner()
    out = tmp_path / "je.csv"
    args = ["journal", "export", "--from", DAYS[0].isoformat(), "--to", DAYS[-1].isoformat()]
    done = runner.invoke(app, [*args, "--out", str(out)])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stderr)
    written = out.read_bytes().decode()
    imported = qbo_import(written)
    assert summary["entries"] == len(imported.entries) > 0
    assert written == export(books.engine, DAYS[0], DAYS[-1])
    to_stdout = runner.invoke(app, args)
    assert to_stdout.exit_code == 0  # (click's runner reads CRLF back as LF)
    assert to_stdout.stdout == written.replace("\r\n", "\n")
    backwards = ["journal", "export", "--from", TODAY.isoformat(), "--to", DAYS[0].isoformat()]
    assert runner.invoke(app, backwards).exit_code == 2
    assert runner.invoke(app, ["journal", "export", "--from", "x", "--to", "y"]).exit_code == 2
