"""The payment routes on a small app, against real SQLite / PostgreSQL and Redis, with
stripe-python talking to the fake Stripe and webhooks signed for real."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from billing import fees, ledger
from billing.meter import UsageMeter
from billing.plans import Plans
from billing.redis_replies import StreamEntry
from core.schema import Provider, StripeEvent
from kernel import redis_keys as rk
from kernel.money import split_cost
from kernel.usage_event import UsageRecord
from serve_app.http_app import create_app
from serve_app.services import Services
from tests.billing import conftest as billing
from tests.billing.fake_stripe import API_KEY, WEBHOOK_SECRET, FakeStripe, client_for, signed

db_url = billing.db_url
engine = billing.engine
r = billing.r
plans = billing.plans
USD = billing.USD
PASSWORD = "a long enough password"


@dataclass
class App:
    client: TestClient
    services: Services
    fake: FakeStripe

    def post(self, path: str, key: str | None = None, **kw):  # type: ignore[no-untyped-def]
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return self.client.post(path, headers={**headers, **kw.pop("headers", {})}, **kw)

    def get(self, path: str, key: str | None = None, **kw):  # type: ignore[no-untyped-def]
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return self.client.get(path, headers=headers, **kw)

    def signup(self, email: str) -> dict:
        response = self.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})
        assert response.status_code == 201, response.text
        return response.json()

    def webhook(self, payload: str, header: str | None = None):  # type: ignore[no-untyped-def]
        sig = signed(payload) if header is None else header
        return self.post(
            "/v1/billing/stripe/webhook",
            content=payload.encode(),
            headers={"stripe-signature": sig, "content-type": "application/json"},
        )

    def balance(self, account_id: int) -> int:
        with Session(self.services.db) as session:
            return ledger.balance(session, ledger.customer_credits(account_id))


@pytest.fixture
def api(db_url: str, engine: Engine, r: redis.Redis, plans: Plans) -> Iterator[App]:
    services = Services.create(
        {
            "database_url": db_url,
            "redis_url": billing.REDIS_URL,
            "stripe_secret_key": API_KEY,
            "stripe_webhook_secret": WEBHOOK_SECRET,
        }
    )
    assert services.stripe is not None  # made from the settings; the test swaps its transport
    fake = FakeStripe(available_cents=0)
    services.stripe = client_for(fake)
    app = create_app(services)
    with TestClient(app) as client:
        yield App(client, services, fake)
    services.db.dispose()


def test_signup_returns_the_account_credits_and_a_first_key(api: App, r: redis.Redis) -> None:
    body = api.signup("New.User@Example.com")
    assert body["object"] == "account" and body["email"] == "new.user@example.com"
    assert body["plan"] == "free" and body["credits_usd"] == "10"
    assert body["credits_nusd"] == 10 * USD
    key = body["api_key"]["key"]
    assert key.startswith("dgpu-") and body["api_key"]["prefix"] == key[:12]
    assert int(r.get(rk.balance(body["id"])) or 0) == 10 * USD

    again = api.post(
        "/v1/auth/signup", json={"email": "new.user@example.com", "password": "x" * 12}
    )
    assert again.status_code == 409
    assert again.json()["error"] == {
        "message": "An account with this email already exists.",
        "type": "invalid_request",
        "param": "email",
        "code": "email_taken",
    }
    short = api.post("/v1/auth/signup", json={"email": "b@example.com", "password": "short"})
    assert short.status_code == 400 and short.json()["error"]["param"] == "password"
    missing = api.post("/v1/auth/signup", json={"email": "c@example.com"})
    assert missing.status_code == 400 and missing.json()["error"]["type"] == "invalid_request"
    assert api.balance(body["id"]) == 10 * USD


def test_checkout_then_webhook_grants_credits_and_cap(api: App, r: redis.Redis) -> None:
    user = api.signup("buyer@example.com")
    key = user["api_key"]["key"]
    assert api.post("/v1/billing/checkout", json={"bundle": "solo"}).status_code == 401
    bad = api.post("/v1/billing/checkout", key, json={"bundle": "mega"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "bundle"
    extra = api.post("/v1/billing/checkout", key, json={"bundle": "solo", "price": 1})
    assert extra.status_code == 400

    made = api.post("/v1/billing/checkout", key, json={"bundle": "solo"})
    assert made.status_code == 200, made.text
    session = made.json()
    assert session["id"].startswith("cs_test_") and session["url"].startswith("https://")
    assert session["amount_cents"] == 5000 and session["bundle"] == "solo"

    payload = api.fake.event("checkout.session.completed", api.fake.pay(session["id"]))
    done = api.webhook(payload)
    assert done.status_code == 200 and done.json()["outcome"] == "applied"
    assert api.balance(user["id"]) == 60 * USD
    assert int(r.get(rk.balance(user["id"])) or 0) == 60 * USD
    # the paid plan: credits are the only limit (the free plan's 200,000/day is not lowered)
    assert r.hmget(rk.account(user["id"]), "plan", "tpd") == [b"paid", None]
    dup = api.webhook(payload)
    assert dup.status_code == 200 and dup.json()["outcome"] == "duplicate"
    assert api.balance(user["id"]) == 60 * USD
    # Stripe's fee on the charge, read after the answer: booked once, clearing holds the net
    with Session(api.services.db) as session:
        assert ledger.balance(session, fees.PAYMENT_FEES) == -175 * USD // 100
        assert ledger.balance(session, ledger.PAYMENT_CLEARING) == -(5000 - 175) * USD // 100

    capped = api.post("/v1/billing/checkout", key, json={"bundle": "solo", "daily_cap": True})
    assert capped.status_code == 200, capped.text
    api.fake.lose_next_response = True  # Stripe does not answer the fee read: the event stands
    second = api.webhook(
        api.fake.event("checkout.session.completed", api.fake.pay(capped.json()["id"]))
    )
    assert second.status_code == 200 and second.json()["outcome"] == "applied"
    assert api.balance(user["id"]) == 110 * USD
    with Session(api.services.db) as session:  # only the first purchase's fee, until a sync
        assert ledger.balance(session, fees.PAYMENT_FEES) == -175 * USD // 100
    assert r.hmget(rk.account(user["id"]), "plan", "tpd") == [b"paid", b"2000"]
    odd = api.post("/v1/billing/checkout", key, json={"bundle": "solo", "daily_cap": "yes"})
    assert odd.status_code == 400 and odd.json()["error"]["param"] == "daily_cap"


@pytest.mark.parametrize("header", ["t=1,v1=deadbeef", "", "stale", "wrong"])
def test_bad_signatures_are_refused_and_change_nothing(api: App, header: str) -> None:
    user = api.signup("sig@example.com")
    made = api.post("/v1/billing/checkout", user["api_key"]["key"], json={"bundle": "team"})
    payload = api.fake.event("checkout.session.completed", api.fake.pay(made.json()["id"]))
    if header == "stale":
        header = signed(payload, timestamp=int(time.time()) - 400)
    elif header == "wrong":
        header = signed(payload, "whsec_not_ours")
    refused = api.webhook(payload, header)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_signature"
    assert api.balance(user["id"]) == 10 * USD
    with Session(api.services.db) as session:
        assert session.scalar(select(func.count()).select_from(StripeEvent)) == 0


def test_payments_off_without_stripe(api: App) -> None:
    key = api.signup("off@example.com")["api_key"]["key"]
    api.services.stripe = None
    off = api.post("/v1/billing/checkout", key, json={"bundle": "solo"})
    assert off.status_code == 503 and off.json()["error"]["type"] == "service_unavailable"
    api.services.settings.stripe_webhook_secret = type(api.services.settings.stripe_webhook_secret)(
        ""
    )
    assert api.webhook(api.fake.event("ping", {})).status_code == 503


def _serve(api: App, customer: int, provider: str, rid: str, day: str, out: int) -> None:
    """A settled request, recorded by the billing meter (as if drained from the stream)."""
    cost = 7 * billing.IN + out * billing.OUT
    share, platform = split_cost(cost)
    ms = int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() * 1000) + 3600_000
    event = UsageRecord(
        request_id=rid,
        account_id=customer,
        key_id=None,
        customer_tag=None,
        model=billing.MODEL.id,
        provider_id=provider,
        prompt_tokens=7,
        completion_tokens=out,
        input_nusd_per_token=billing.IN,
        output_nusd_per_token=billing.OUT,
        cost_nusd=cost,
        provider_share_nusd=share,
        platform_share_nusd=platform,
        outcome="settled",
        usage_day=day,
        created_at_ms=ms,
        settled_at_ms=ms + 1000,
    )
    meter = UsageMeter(api.services.db, api.services.redis)
    assert meter.record([StreamEntry("1-0", event.to_stream())]) == []


def test_provider_onboarding_and_earnings(api: App) -> None:
    owner = api.signup("gpu.owner@example.com")
    key = owner["api_key"]["key"]
    assert api.post("/v1/providers/me/stripe/onboarding").status_code == 401
    none = api.post("/v1/providers/me/stripe/onboarding", key)
    assert none.status_code == 404 and none.json()["error"]["code"] == "no_providers"
    assert api.get("/v1/providers/me/earnings", key).status_code == 404
    with Session(api.services.db) as session, session.begin():
        session.add(Provider(id="prv_rig1", account_id=owner["id"], name="rig one"))
        session.add(Provider(id="prv_rig2", account_id=owner["id"], name="rig two"))

    link = api.post("/v1/providers/me/stripe/onboarding", key)
    assert link.status_code == 200, link.text
    body = link.json()
    assert body["url"].startswith("https://connect.stripe.com/")
    assert body["stripe_account_id"].startswith("acct_") and body["payouts_enabled"] is False
    again = api.post("/v1/providers/me/stripe/onboarding", key).json()
    assert again["stripe_account_id"] == body["stripe_account_id"] and len(api.fake.accounts) == 1
    enabled = api.fake.onboard(body["stripe_account_id"])
    assert api.webhook(api.fake.event("account.updated", enabled)).json()["outcome"] == "applied"

    customer = api.signup("customer@example.com")["id"]
    _serve(api, customer, "prv_rig1", "q1", "2026-01-05", 1_000)
    _serve(api, customer, "prv_rig1", "q2", "2026-01-05", 2_000)
    _serve(api, customer, "prv_rig2", "q3", "2026-01-06", 500)
    _serve(api, customer, "prv_other", "q4", "2026-01-06", 9_000)  # not theirs
    got = api.get(
        "/v1/providers/me/earnings", key, params={"start": "2026-01-01", "end": "2026-01-31"}
    )
    assert got.status_code == 200, got.text
    e = got.json()
    assert e["object"] == "provider_earnings" and e["payouts_enabled"] is True
    assert [(d["day"], d["provider_id"], d["requests"]) for d in e["data"]] == [
        ("2026-01-05", "prv_rig1", 2),
        ("2026-01-06", "prv_rig2", 1),
    ]
    share = (2 * 7 * billing.IN + 3_000 * billing.OUT) * 95 // 100
    assert e["data"][0]["earned_nusd"] == share
    total = sum(d["earned_nusd"] for d in e["data"])
    assert e["total_earned_nusd"] == total == e["payable_nusd"]
    assert {p["id"] for p in e["providers"]} == {"prv_rig1", "prv_rig2"}
    bad = api.get("/v1/providers/me/earnings", key, params={"start": "Jan 1"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "start"
    backwards = api.get(
        "/v1/providers/me/earnings", key, params={"start": "2026-02-01", "end": "2026-01-01"}
    )
    assert backwards.status_code == 400
