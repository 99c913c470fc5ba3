"""The account page's low-balance email and account deletion, on the app `create_app`
builds, real SQLite, a real Redis and a real SMTP server (aiosmtpd): the email goes once per
crossing of the customer's threshold; a deleted account's keys, sessions, password and
email are gone at once while its ledger stays, and its address earns no second grant."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path

import pytest
import redis.asyncio as aredis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import accounts, email_verification, ledger, low_balance, signup
from billing.admission import Admission
from billing.plans import load_plans
from cluster import registry
from core.schema import Account, AccountPassword
from kernel import redis_keys as rk
from kernel.tokens import hash_key
from serve_app.http_app import create_app
from serve_app.services import Services
from tests.billing.conftest import MODEL, REPO, USD
from tests.serve_app.test_console_app import PASSWORD, REDIS_URL, client, csrf_of, signed_up
from tests.serve_app.test_console_passwords import inbox, make_services  # noqa: F401
from tests.serve_app.test_email_verification import Inbox, free_port


@pytest.fixture
def svc(tmp_path: Path, inbox: Inbox) -> Iterator[Services]:  # noqa: F811
    services = make_services(tmp_path, smtp_host="127.0.0.1", smtp_port=inbox.port,
                             smtp_starttls=False, public_url="https://dg.test")  # fmt: skip
    yield services
    services.redis.flushdb()
    services.db.dispose()


@pytest.fixture
def app(svc: Services) -> FastAPI:
    return create_app(svc)


def alerts(inbox: Inbox, to: str) -> list[str]:  # noqa: F811
    found = []
    for mail in inbox.mail:
        parsed = message_from_bytes(mail.as_bytes())
        if parsed["To"] == to and "running low" in parsed["Subject"]:
            found.append(parsed.get_payload(decode=True).decode())
    return found


def spend(key: str, request_id: str, tokens: int) -> None:
    """One request of `tokens` prompt tokens ($1 per million), admitted and settled."""

    async def run() -> None:
        client = aredis.Redis.from_url(REDIS_URL)
        try:
            plans = load_plans(REPO / "configs" / "plans.toml")
            admission = Admission(client, plans, hold_ttl_s=600)
            admitted = await admission.admit(api_key=key, request_id=request_id, model=MODEL,
                                             prompt_tokens=tokens, max_tokens=1,
                                             customer_tag=None)  # fmt: skip
            assert type(admitted).__name__ == "Admitted", admitted
            await admission.settle(request_id=request_id, prompt_tokens=tokens,
                                   completion_tokens=0, provider_id="prov-a")  # fmt: skip
        finally:
            await client.aclose()

    asyncio.run(run())


def test_the_low_balance_email_goes_once_per_crossing(
    app: FastAPI,
    svc: Services,
    inbox: Inbox,  # noqa: F811
) -> None:
    c, csrf = signed_up(app, "thrifty@example.com")
    account_id = accounts.find_account(svc.db, "thrifty@example.com").id
    accounts.grant_credits(svc.db, svc.redis, account_id=account_id, amount_nusd=10 * USD)
    accounts.set_plan(svc.db, svc.redis, svc.plans, account_id=account_id, plan="paid")  # no cap
    key = accounts.create_key(svc.db, svc.redis, account_id=account_id).key

    def set_threshold(text: str):
        return c.post("/console/account/low-balance",
                      data={"threshold_usd": text, "csrf_token": csrf})  # fmt: skip

    for bad in ("abc", "-1", "0", "1e400", "0.0000000001"):
        refused = set_threshold(bad)
        assert refused.status_code == 400 and "in dollars" in refused.text, bad
    assert accounts.low_balance_of(svc.db, account_id) is None
    saved = set_threshold("$9.50")
    assert saved.status_code == 303
    assert "$9.50" in c.get(saved.headers["location"]).text

    assert low_balance.check(svc.db, svc.redis, svc.settings).sent == 0  # $10: above it
    spend(key, "r1", 1_000_000)  # $1: $9 left, below $9.50
    assert low_balance.check(svc.db, svc.redis, svc.settings).sent == 1
    [body] = alerts(inbox, "thrifty@example.com")
    assert "$9.00" in body and "$9.50" in body and "https://dg.test/console/billing" in body
    spend(key, "r2", 100_000)  # still below: no second mail
    assert low_balance.check(svc.db, svc.redis, svc.settings).sent == 0
    assert len(alerts(inbox, "thrifty@example.com")) == 1

    accounts.grant_credits(svc.db, svc.redis, account_id=account_id, amount_nusd=5 * USD)
    assert low_balance.check(svc.db, svc.redis, svc.settings).rearmed == 1  # back above
    spend(key, "r3", 5_000_000)  # $13.90 → $8.90: a second crossing, a second mail
    report = low_balance.check(svc.db, svc.redis, svc.settings)
    assert report.sent == 1 and len(alerts(inbox, "thrifty@example.com")) == 2

    off = set_threshold("")
    assert off.status_code == 303 and accounts.low_balance_of(svc.db, account_id) is None
    assert low_balance.check(svc.db, svc.redis, svc.settings).checked == 0


def test_a_mail_that_fails_is_sent_on_a_later_check(tmp_path: Path, inbox: Inbox) -> None:  # noqa: F811
    down = make_services(tmp_path, smtp_host="127.0.0.1", smtp_port=free_port(),
                         smtp_starttls=False)  # fmt: skip
    try:
        account = accounts.create_account(down.db, down.redis, down.plans, email="a@example.com")
        accounts.set_low_balance(down.db, account_id=account.id, threshold_nusd=100 * USD)
        assert low_balance.check(down.db, down.redis, down.settings).sent == 0  # SMTP away
        with Session(down.db) as session:
            assert session.get(Account, account.id).low_balance_notified_at is None
        down.settings.smtp_port = inbox.port  # back
        assert low_balance.check(down.db, down.redis, down.settings).sent == 1
        assert len(alerts(inbox, "a@example.com")) == 1
    finally:
        down.redis.flushdb()
        down.db.dispose()


def test_deleting_the_account_ends_access_and_keeps_the_ledger(
    app: FastAPI,
    svc: Services,
    inbox: Inbox,  # noqa: F811
) -> None:
    c, csrf = signed_up(app, "leaver@example.com")
    elsewhere = client(app)
    sign_in = {"email": "leaver@example.com", "password": PASSWORD}
    form = elsewhere.get("/console/login")
    sign_in["csrf_token"] = csrf_of(form.text)
    assert elsewhere.post("/console/login", data=sign_in).status_code == 303
    stays, _ = signed_up(app, "stays@example.com")
    account_id = accounts.find_account(svc.db, "leaver@example.com").id
    accounts.grant_credits(svc.db, svc.redis, account_id=account_id, amount_nusd=3 * USD)
    accounts.set_plan(svc.db, svc.redis, svc.plans, account_id=account_id, plan="paid")
    key = accounts.create_key(svc.db, svc.redis, account_id=account_id, name="k").key
    gpu = registry.create_provider(svc.db, account_id=account_id, name="rig")
    spend(key, "before", 1_000_000)
    with Session(svc.db) as session:
        credits_before = ledger.balance(session, ledger.customer_credits(account_id))

    def delete(password: str, confirm: str = "DELETE"):
        fields = {"password": password, "confirm": confirm, "csrf_token": csrf}
        return c.post("/console/account/delete", data=fields)

    assert delete(PASSWORD, confirm="delete").status_code == 400
    wrong = delete("not the password")
    assert wrong.status_code == 400 and "password is not right" in wrong.text
    assert c.get("/console/overview").status_code == 200  # nothing happened yet
    gone = delete(PASSWORD)
    assert gone.status_code == 303 and gone.headers["location"] == "/console/login?deleted=1"
    assert 'dgpu_session=""' in gone.headers["set-cookie"]

    for browser in (c, elsewhere):
        assert browser.get("/console/overview").status_code == 303  # signed out everywhere
    assert stays.get("/console/overview").status_code == 200
    assert not svc.redis.exists(rk.api_key(hash_key(key)))
    with TestClient(app) as api:
        refused = api.get("/v1/keys", headers={"authorization": f"Bearer {key}"})
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "auth"
    with pytest.raises(registry.ProviderAuthError):
        registry.authenticate(svc.db, gpu.token)
    assert registry.get_provider(svc.db, gpu.provider.id).review == "revoked"
    with Session(svc.db) as session:
        row = session.get(Account, account_id)
        assert row.deleted_at is not None and "leaver" not in row.email
        assert session.get(AccountPassword, account_id) is None
        # the ledger stays: the purchase of credits and their use are still on the books
        assert ledger.balance(session, ledger.customer_credits(account_id)) == credits_before
        emails = session.scalars(select(Account.email)).all()
    assert not any("leaver" in e for e in emails)
    assert signup.verify_password(svc.db, "leaver@example.com", PASSWORD) is None
    login = client(app)
    sign_in["csrf_token"] = csrf_of(login.get("/console/login").text)
    signin = login.post("/console/login", data=sign_in)
    assert signin.status_code == 400

    # the address may sign up again, but earns no second signup grant
    mailer = email_verification.mailer_for(svc.settings, svc.redis)
    again = signup.signup(svc.db, svc.redis, svc.plans, email="Leaver@example.com",
                          password=PASSWORD, mailer=mailer)  # fmt: skip
    assert again.account.id != account_id and again.account.balance_nusd == 0
    assert again.verification is None
    fresh = signup.signup(svc.db, svc.redis, svc.plans, email="new@example.com",
                          password=PASSWORD, mailer=mailer)  # fmt: skip
    assert fresh.verification == "sent"  # an address never deleted: credits follow its link
    with pytest.raises(accounts.AccountError):
        accounts.delete_account(svc.db, svc.redis, account_id=account_id)
    assert re.search(r"deleted-\d+-[0-9a-f]{32}@deleted\.invalid", emails[account_id - 1])
