"""Stripe's fees in the ledger (issue 14): read from the balance transactions of charges,
refunds and disputes, booked once each, reconciled, and never guessed."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
import stripe
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from billing import fees, ledger
from billing.cli import app
from billing.plans import Plans
from billing.reconcile import reconcile
from billing.verify import verify_ledger
from core.schema import LedgerTransfer, StripeMovement
from kernel.money import NUSD_PER_CENT as CENT
from tests.billing.conftest import REDIS_URL, REPO
from tests.billing.fake_stripe import API_KEY, client_for, serve
from tests.billing.payments_harness import Harness

TODAY = datetime.now(UTC).date()


@pytest.fixture
def h(engine: Engine, r: redis.Redis, plans: Plans) -> Harness:
    return Harness(engine, r, plans)


def fees_account(engine: Engine) -> int:
    with Session(engine) as session:
        return ledger.balance(session, fees.PAYMENT_FEES)


def clearing(engine: Engine) -> int:
    with Session(engine) as session:
        return ledger.balance(session, ledger.PAYMENT_CLEARING)


def transfers(engine: Engine, kind: str) -> list[LedgerTransfer]:
    with Session(engine) as session:
        return list(session.scalars(select(LedgerTransfer).where(LedgerTransfer.kind == kind)))


def failing(engine: Engine, r: redis.Redis) -> dict[str, list[str]]:
    report = reconcile(engine, r, day=TODAY)
    return {c.name: c.problems for c in report.checks if not c.ok}


def pi_of(h: Harness, session_id: str) -> str:
    return str(h.fake.sessions[session_id]["payment_intent"])


def test_a_purchase_books_the_fee_of_its_balance_transaction(h: Harness) -> None:
    aid = h.account()
    cs = h.buy(aid, "team")  # $150: Stripe keeps 2.9% + 30¢ = $4.65
    assert h.fake.charge_fee(cs) == 465
    assert fees_account(h.engine) == -465 * CENT
    # the clearing account now says what Stripe holds: the charge's net
    assert clearing(h.engine) == -h.fake.net_cents() * CENT == -(15_000 - 465) * CENT
    assert h.balance(aid) == 160 * CENT * 100  # the customer gets the whole bundle
    [fee] = transfers(h.engine, fees.FEE_KIND)
    txn = h.fake._charge_of(cs)["balance_transaction"]
    assert fee.idempotency_key == f"fee:{txn}"
    available = datetime.fromtimestamp(h.fake.balance_transactions[txn]["available_on"], UTC)
    assert fee.memo is not None and "stripe_fee 465" in fee.memo
    assert f"available {available.date().isoformat()}" in fee.memo
    assert verify_ledger(h.engine).ok
    assert failing(h.engine, h.r) == {}


def test_each_fee_is_booked_once_however_often_it_is_read(h: Harness) -> None:
    aid = h.account()
    cs = h.checkout(aid, "solo")
    payload = h.fake.event("checkout.session.completed", h.fake.pay(cs))
    assert h.deliver_raw(payload).outcome == "applied"
    assert h.deliver_raw(payload).outcome == "duplicate"
    # another event about the same session reads the fees again: nothing new
    assert h.deliver("checkout.session.completed", h.fake.sessions[cs]).outcome == (
        "already_fulfilled"
    )
    assert fees.sync_fees(h.engine, h.client).posted == []
    # readers racing on the same payment (the webhook and `admin fees sync`)
    barrier = threading.Barrier(4)
    results: list[fees.FeeReport] = []

    def read() -> None:
        client = client_for(h.fake)
        barrier.wait()
        results.append(fees.record_payment_fees(h.engine, client, pi_of(h, cs)))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r.ok for r in results)
    assert len(transfers(h.engine, fees.FEE_KIND)) == 1
    assert fees_account(h.engine) == -175 * CENT
    assert failing(h.engine, h.r) == {}


def test_a_balance_transaction_not_attached_yet_is_booked_later(h: Harness) -> None:
    h.fake.hold_balance_transactions = True
    aid = h.account()
    cs = h.buy(aid, "solo")
    assert h.balance(aid) == 60 * 100 * CENT  # paid credits never wait for the fee
    assert transfers(h.engine, fees.FEE_KIND) == []
    problems = failing(h.engine, h.r)
    assert list(problems) == ["fees"]
    assert pi_of(h, cs) in problems["fees"][0] and "not booked" in problems["fees"][0]
    report = fees.sync_fees(h.engine, h.client)
    assert report.posted == [] and report.pending and "not attached" in report.pending[0]
    h.fake.attach_balance_transactions()
    report = fees.sync_fees(h.engine, h.client)
    assert len(report.posted) == 1 and report.posted_nusd == 175 * CENT
    assert failing(h.engine, h.r) == {}
    assert clearing(h.engine) == -h.fake.net_cents() * CENT


def test_delayed_payments_book_their_fee_when_they_succeed(h: Harness) -> None:
    aid = h.account()
    cs = h.checkout(aid, "solo")
    assert h.deliver("checkout.session.completed", h.fake.pay(cs, delayed=True)).outcome == (
        "awaiting_payment"
    )
    assert transfers(h.engine, fees.FEE_KIND) == []
    settled = h.fake.settle_delayed(cs)
    assert h.deliver("checkout.session.async_payment_succeeded", settled).outcome == "applied"
    assert fees_account(h.engine) == -175 * CENT
    assert failing(h.engine, h.r) == {}


def test_refund_and_dispute_fees_and_their_reversals(h: Harness) -> None:
    aid = h.account()
    cs = h.buy(aid, "team")  # $150, fee $4.65
    # a refund on pricing that returns part of the fee: a negative fee on the refund
    assert h.deliver("charge.refunded", h.fake.refund(cs, 5_000, fee_returned=145)).outcome == (
        "applied"
    )
    [back] = transfers(h.engine, fees.FEE_REFUND_KIND)
    assert fees_account(h.engine) == -(465 - 145) * CENT
    assert clearing(h.engine) == -h.fake.net_cents() * CENT
    # a refund that returns no fee (Stripe's usual rule) books nothing more
    assert h.deliver("charge.refunded", h.fake.refund(cs, 1_000)).outcome == "applied"
    assert len(transfers(h.engine, fees.FEE_KIND)) == 1
    assert len(transfers(h.engine, fees.FEE_REFUND_KIND)) == 1
    # a dispute of the rest costs the $15 dispute fee on top of the disputed amount
    dispute = h.fake.dispute(cs, 9_000)
    assert h.deliver("charge.dispute.created", dispute).outcome == "applied"
    assert fees_account(h.engine) == -(465 - 145 + 1_500) * CENT
    assert clearing(h.engine) == -h.fake.net_cents() * CENT
    # won: Stripe returns the dispute fee (the reinstated amount is not booked yet: see report)
    won = h.fake.close_dispute(dispute["id"], won=True)
    assert h.deliver("charge.dispute.closed", won).outcome == "applied"
    assert fees_account(h.engine) == -h.fake.fees_cents() * CENT == -(465 - 145) * CENT
    assert len(transfers(h.engine, fees.FEE_REFUND_KIND)) == 2
    assert fees.sync_fees(h.engine, h.client).posted == []  # all booked already
    assert verify_ledger(h.engine).ok
    assert "fees" not in failing(h.engine, h.r)


@pytest.mark.parametrize("tamper", ["net", "fee_details", "currency", "source"])
def test_balance_transactions_that_do_not_add_up_are_refused(h: Harness, tamper: str) -> None:
    """Stripe's own arithmetic (net = amount - fee = amount - Σ fee_details), the books'
    currency and the object a transaction belongs to are checked; what fails is reported and
    never booked, and the reconciliation keeps saying so."""
    h.fake.hold_balance_transactions = True
    aid = h.account()
    cs = h.buy(aid, "solo")
    h.fake.attach_balance_transactions()
    txn = h.fake.balance_transactions[h.fake._charge_of(cs)["balance_transaction"]]
    if tamper == "net":
        txn["net"] = txn["amount"]  # as if no fee were taken
    elif tamper == "fee_details":
        txn["fee_details"][0]["amount"] = 1
    elif tamper == "currency":
        txn["currency"] = "eur"
    else:
        txn["source"] = "ch_someone_else"
    report = fees.record_payment_fees(h.engine, h.client, pi_of(h, cs))
    assert not report.ok and report.posted == []
    assert txn["id"] in report.problems[0]
    assert fees_account(h.engine) == 0
    assert list(failing(h.engine, h.r)) == ["fees"]


def test_a_payment_that_is_not_ours_is_not_read(h: Harness) -> None:
    report = fees.record_payment_fees(h.engine, h.client, "pi_not_darkgpu")
    assert not report.ok and "not a DarkGPU payment" in report.problems[0]
    assert not [c for c in h.fake.calls if "payment_intents" in c[1]]


def test_stripe_unreachable_at_payment_then_the_cli_books_the_fee(
    h: Harness, db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    aid = h.account()
    cs = h.checkout(aid, "solo")
    paid = h.fake.pay(cs)
    h.fake.lose_next_response = True  # the fee read after the grant gets no answer
    assert h.deliver("checkout.session.completed", paid).outcome == "applied"
    assert h.balance(aid) == 60 * 100 * CENT
    assert transfers(h.engine, fees.FEE_KIND) == []
    monkeypatch.setenv("DARKGPU_DATABASE_URL", db_url)
    monkeypatch.setenv("DARKGPU_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("DARKGPU_PLANS_FILE", str(REPO / "configs" / "plans.toml"))
    runner = CliRunner()
    skipped = runner.invoke(app, ["reconcile", "--date", TODAY.isoformat(), "--no-stripe-fees"])
    assert skipped.exit_code == 1, skipped.output
    body = json.loads(skipped.stdout)
    assert [c["name"] for c in body["checks"] if not c["ok"]] == ["fees"]
    unconfigured = runner.invoke(app, ["fees", "sync"])
    assert unconfigured.exit_code == 1 and "not configured" in unconfigured.output
    with serve(h.fake) as base:
        monkeypatch.setenv("DARKGPU_STRIPE_SECRET_KEY", API_KEY)
        monkeypatch.setenv("DARKGPU_STRIPE_API_BASE", base)
        done = runner.invoke(app, ["reconcile", "--date", TODAY.isoformat()])
        assert done.exit_code == 0, done.output
        body = json.loads(done.stdout)
        assert body["ok"] is True and body["fees_sync"]["posted"] == 1
        again = runner.invoke(app, ["fees", "sync", "--since", TODAY.isoformat()])
        assert again.exit_code == 0, again.output
        assert json.loads(again.stdout)["posted"] == 0
    assert fees_account(h.engine) == -175 * CENT
    with Session(h.engine) as session:
        kinds = session.execute(
            select(StripeMovement.kind, func.sum(StripeMovement.amount_cents)).group_by(
                StripeMovement.kind
            )
        ).all()
    assert dict(kinds) == {"charge": 5_000, "fee": 175}


def test_the_fake_reads_like_stripe(h: Harness) -> None:
    """What billing.fees relies on, through stripe-python against the fake: expansion (and
    its errors), lists with pagination, and unknown ids."""
    aid = h.account()
    cs = h.buy(aid, "solo")
    for cents in (100, 200, 300):
        h.fake.refund(cs, cents)
    pi = pi_of(h, cs)
    got = h.client.v1.payment_intents.retrieve(
        pi, params={"expand": ["latest_charge.balance_transaction"]}
    )
    assert isinstance(got.latest_charge, stripe.Charge)
    assert isinstance(got.latest_charge.balance_transaction, stripe.BalanceTransaction)
    assert got.latest_charge.balance_transaction.fee == 175
    plain_pi = h.client.v1.payment_intents.retrieve(pi)
    assert isinstance(plain_pi.latest_charge, str)
    with pytest.raises(stripe.InvalidRequestError, match="cannot be expanded \\(metadata\\)"):
        h.client.v1.payment_intents.retrieve(pi, params={"expand": ["metadata"]})
    with pytest.raises(stripe.InvalidRequestError, match="more than 4 levels"):
        h.client.v1.payment_intents.retrieve(pi, params={"expand": ["a.b.c.d.e"]})
    with pytest.raises(stripe.InvalidRequestError, match="data.balance_transaction"):
        h.client.v1.refunds.list(params={"payment_intent": pi, "expand": ["balance_transaction"]})
    page = h.client.v1.refunds.list(
        params={"payment_intent": pi, "limit": 1, "expand": ["data.balance_transaction"]}
    )
    assert page.has_more and len(page.data) == 1
    every = list(page.auto_paging_iter())
    assert sorted(r.amount for r in every) == [100, 200, 300]
    assert all(r.balance_transaction.amount == -r.amount for r in every)
    assert h.client.v1.refunds.list(params={"payment_intent": "pi_other"}).data == []
    with pytest.raises(stripe.InvalidRequestError) as missing:
        h.client.v1.balance_transactions.retrieve("txn_nope")
    assert missing.value.code == "resource_missing" and missing.value.http_status == 404
