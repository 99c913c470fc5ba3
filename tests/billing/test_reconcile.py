import csv
import io
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from billing import accounts, connect, journal, ledger
from billing.admission import Admission, Admitted
from billing.cli import app
from billing.meter import UsageMeter
from billing.payouts import IsoWeek, run_payouts
from billing.plans import Plans
from billing.reconcile import reconcile
from kernel import redis_keys as rk
from tests.billing.conftest import MODEL, REDIS_URL, REPO, USD
from tests.billing.payments_harness import Harness

TODAY = datetime.now(UTC).date()


@dataclass
class Books:
    h: Harness
    customer: int
    key: str


async def request(adm: Admission, key: str, rid: str, out: int, provider: str = "prv_a") -> None:
    result = await adm.admit(
        api_key=key, request_id=rid, model=MODEL, prompt_tokens=7, max_tokens=out, customer_tag=None
    )
    assert isinstance(result, Admitted)
    await adm.settle(request_id=rid, prompt_tokens=7, completion_tokens=out, provider_id=provider)


@pytest.fixture
async def books(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> Books:
    """A day of business: signups, a purchase, usage, a partial refund and a payout."""
    h = Harness(engine, r, plans)
    h.fake.available_cents = 10_000
    owner = h.account()
    h.provider(owner, "prv_a")
    link = connect.onboarding_link(engine, h.client, h.settings, account_id=owner)
    h.deliver("account.updated", h.fake.onboard(link.stripe_account_id))
    customer = h.account()
    session_id = h.buy(customer, "team")  # $160, cap 7,000 tokens/day
    accounts.set_limits(engine, r, account_id=customer, tokens_per_day=None)
    key = accounts.create_key(engine, r, account_id=customer).key
    assert key is not None
    for i in range(3):
        await request(admission, key, f"day-{i}", 2_000_000 + i)  # ~$4 each
    meter.drain_all()
    h.deliver("charge.refunded", h.fake.refund(session_id, 2_500))
    week = IsoWeek.of(datetime.now(UTC))
    report = run_payouts(engine, h.client, week=week, now=week.end + timedelta(minutes=1))
    assert [i.status for i in report.items] == ["paid"]
    return Books(h, customer, key)


def failing(report) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    return {c.name: c.problems for c in report.checks if not c.ok}


def test_a_clean_day_reconciles(books: Books) -> None:
    report = reconcile(books.h.engine, books.h.r, day=TODAY)
    assert report.ok, failing(report)
    body = report.to_json()
    checks = {c["name"]: c for c in body["checks"]}
    assert checks["usage"]["requests"] == 3
    assert checks["stripe"]["day"] == {
        "charge_cents": 15_000,
        "refund_cents": 2_500,
        "transfer_cents": 3 * 2_000_000 * 2_000 * 95 // 100 // 10**7,
        "fee_cents": 435 + 30,  # Stripe's 2.9% + 30¢ of $150
    }
    assert checks["fees"]["day_fee_cents"] == 465 and checks["fees"]["day_fee_refund_cents"] == 0
    assert checks["stripe"]["stripe_total_nusd"] == checks["stripe"]["clearing_stripe_nusd"]


def test_the_journal_balances_each_day(books: Books) -> None:
    out = io.StringIO()
    n = journal.write(books.h.engine, out, start=TODAY - timedelta(days=1), end=TODAY)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == 2 * n > 0  # yesterday had nothing; each entry has two lines
    assert tuple(rows[0]) == journal.COLUMNS
    debit = sum(Decimal(line["Debits"] or 0) for line in rows)
    credit = sum(Decimal(line["Credits"] or 0) for line in rows)
    assert debit == credit > 0
    accounts_seen = {line["AccountName"] for line in rows}
    assert {"Stripe clearing", "Customer credits", "Provider payable", "Platform revenue"} <= (
        accounts_seen
    )
    assert "Stripe fees" in accounts_seen


def test_accounts_never_granted_credits_reconcile_quietly(books: Books, plans: Plans) -> None:
    """Issue 14: three accounts made with no credits have no Redis balance key, which
    admission reads as 0; the daily check paged the operator for each of them."""
    for _ in range(3):
        made = accounts.create_account(books.h.engine, books.h.r, plans,
                                       email=f"empty{time.monotonic_ns()}@example.com",
                                       plan="paid")  # fmt: skip
        assert books.h.r.get(rk.balance(made.id)) is None
    report = reconcile(books.h.engine, books.h.r, day=TODAY)
    assert report.ok, failing(report)
    books.h.r.set(rk.balance(made.id), 5)  # but a balance SQL does not know is drift
    assert list(failing(reconcile(books.h.engine, books.h.r, day=TODAY))) == ["redis_balances"]


def test_a_planted_redis_drift_fails(books: Books) -> None:
    books.h.r.incrby(rk.balance(books.customer), 1)
    report = reconcile(books.h.engine, books.h.r, day=TODAY)
    assert not report.ok and list(failing(report)) == ["redis_balances"]


def test_a_clearing_entry_without_stripe_fails(books: Books) -> None:
    with Session(books.h.engine) as session, session.begin():
        ledger.post_transfer(
            session,
            idempotency_key="purchase:cs_test_never_paid",
            kind="purchase",
            legs=[ledger.Leg(ledger.PAYMENT_CLEARING, ledger.PROMOTIONAL_GRANTS, 5 * USD)],
        )
    report = reconcile(books.h.engine, books.h.r, day=TODAY)
    assert list(failing(report)) == ["stripe"]
    assert "cs_test_never_paid" in failing(report)["stripe"][0]


async def test_undrained_usage_and_stale_holds_fail(books: Books, admission: Admission) -> None:
    await request(admission, books.key, "late", 10)  # settled, not drained yet
    held = await admission.admit(
        api_key=books.key, request_id="held", model=MODEL, prompt_tokens=1, max_tokens=5,
        customer_tag=None,
    )  # fmt: skip
    assert isinstance(held, Admitted)
    report = reconcile(books.h.engine, books.h.r, day=TODAY)
    assert set(failing(report)) == {"usage_stream"}  # balances account for both
    later = reconcile(books.h.engine, books.h.r, day=TODAY, now=time.time() + 7200)
    assert set(failing(later)) == {"usage_stream", "reservations"}


def test_cli_reconcile_exit_status_and_csv(
    books: Books, db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DARKGPU_DATABASE_URL", db_url)
    monkeypatch.setenv("DARKGPU_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("DARKGPU_PLANS_FILE", str(REPO / "configs" / "plans.toml"))
    runner = CliRunner()
    journal_csv = tmp_path / "journal.csv"
    ok = runner.invoke(app, ["reconcile", "--date", TODAY.isoformat(), "--csv", str(journal_csv)])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["ok"] is True
    assert journal_csv.read_text().startswith(",".join(journal.COLUMNS))
    books.h.r.decrby(rk.balance(books.customer), 5)
    bad = runner.invoke(app, ["reconcile", "--date", TODAY.isoformat()])
    assert bad.exit_code == 1 and json.loads(bad.stdout)["ok"] is False
    assert runner.invoke(app, ["reconcile", "--date", "yesterday"]).exit_code != 0
    dry = runner.invoke(app, ["payouts", "run", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["dry_run"] is True
    assert runner.invoke(app, ["payouts", "run", "--week", "2026-W99", "--dry-run"]).exit_code == 1
    unconfigured = runner.invoke(app, ["payouts", "run"])  # no Stripe key here
    assert unconfigured.exit_code == 1 and "not configured" in unconfigured.output
