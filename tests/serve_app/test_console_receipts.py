"""Receipts in the console: every purchase in the billing page's history links to a
printable receipt of it (amount, currency, bundle, dates, status, refunds), built from what
the real webhook handler recorded from a Stripe that behaves like Stripe (the fake); another
account's receipt is 404."""

from __future__ import annotations

import re

from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import accounts
from billing.receipts import number_of
from core.schema import StripePayment
from serve_app.services import Services
from tests.billing.payments_harness import Harness
from tests.serve_app import test_console_app as console
from tests.serve_app.test_console_app import signed_up

svc = console.svc
app = console.app


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_each_purchase_has_a_receipt_its_buyer_alone_can_open(app: FastAPI, svc: Services) -> None:
    buyer, _ = signed_up(app, "buyer@example.com")
    other, _ = signed_up(app, "other@example.com")
    buyer_id = accounts.find_account(svc.db, "buyer@example.com").id
    h = Harness(svc.db, svc.redis, svc.plans)
    paid = h.buy(buyer_id, "solo")
    assert h.deliver("charge.refunded", h.fake.refund(paid, 2000)).outcome == "applied"
    h.checkout(buyer_id, "team")  # started, never paid
    with Session(svc.db) as session:
        ids = {p.bundle: p.id for p in session.scalars(select(StripePayment))}

    billing = buyer.get("/console/billing")
    for bundle, payment_id in ids.items():
        link = f'href="/console/billing/receipts/{payment_id}">{number_of(payment_id)}</a>'
        assert link in billing.text, bundle

    solo = buyer.get(f"/console/billing/receipts/{ids['solo']}")
    assert solo.status_code == 200
    words = text_of(solo.text)
    for expected in (
        f"Receipt {number_of(ids['solo'])}",
        "buyer@example.com (account",
        "Solo credit bundle",
        "Amount $50.00 USD",
        "Status paid",
        "Refunded $20.00 USD",
        "Net paid $30.00 USD",
        "Credits taken back $20.00",
    ):
        assert expected in words, expected
    assert "UTC" in words and "Print this receipt" in words
    team = text_of(buyer.get(f"/console/billing/receipts/{ids['team']}").text)
    assert "Status awaiting payment" in team and "Paid not yet" in team and "Refunded" not in team

    for payment_id in ids.values():  # the other account, signed in, at the buyer's receipts
        stolen = other.get(f"/console/billing/receipts/{payment_id}")
        assert stolen.status_code == 404 and "no such receipt" in stolen.text
        assert "buyer@example.com" not in stolen.text
    assert other.get("/console/billing/receipts/999999").status_code == 404
    assert other.get("/console/billing/receipts/0").status_code == 400
    assert other.get("/console/billing/receipts/x").status_code == 400
