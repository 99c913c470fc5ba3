"""The self-service pages in a real browser (Debian's Chromium, driven by Playwright) against
the app `create_app` builds, served over HTTP by uvicorn, on real SQLite, a real Redis and a
real SMTP server (aiosmtpd): keys (expiry, rename, usage), daily caps (the account's own, a
key's, a customer's), the account page (password, low-balance email), a password reset by
the mailed link, a receipt, a GPU approved by the operator, its token rotated and the GPU
removed, the enterprise form. Every page at desktop and phone width, none of them scrolling
sideways; screenshots under `artifacts/selfservice/`."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI

from billing import accounts
from serve_app.http_app import create_app
from serve_app.services import Services
from tests.billing.payments_harness import Harness
from tests.serve_app.test_console_passwords import inbox, make_services  # noqa: F401
from tests.serve_app.test_email_verification import Inbox

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
WIDTHS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
SHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "selfservice"
PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a much better passphrase"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")


@pytest.fixture
def svc(tmp_path: Path, inbox: Inbox) -> Iterator[Services]:  # noqa: F811
    services = make_services(tmp_path, smtp_host="127.0.0.1", smtp_port=inbox.port,
                             smtp_starttls=False)  # fmt: skip
    yield services
    services.redis.flushdb()
    services.db.dispose()


@pytest.fixture
def served(svc: Services) -> Iterator[str]:
    app: FastAPI = create_app(svc)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the test server never started"
        time.sleep(0.05)
    svc.settings.public_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield svc.settings.public_url
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def reset_link(inbox: Inbox, to: str) -> str:  # noqa: F811
    deadline = time.monotonic() + 30
    while True:  # the mail leaves after the answer
        for mail in inbox.mail:
            parsed = message_from_bytes(mail.as_bytes())
            if parsed["To"] == to and "Reset" in parsed["Subject"]:
                text = parsed.get_payload(decode=True).decode()
                return re.search(r"(http://\S+/console/reset/confirm\?token=\S+)", text)[1]
        assert time.monotonic() < deadline, "no reset mail arrived"
        time.sleep(0.1)


@pytest.mark.parametrize("width", list(WIDTHS))
def test_self_service_pages_in_the_browser(
    served: str,
    svc: Services,
    inbox: Inbox,  # noqa: F811
    width: str,
) -> None:
    from playwright.sync_api import expect, sync_playwright

    console = served + "/console"
    email = f"{width}@example.com"
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport=WIDTHS[width])
        page = context.new_page()

        def shot(name: str) -> None:
            page.screenshot(path=str(SHOTS / f"{name}-{width}.png"), full_page=True)
            wide = page.evaluate("document.documentElement.scrollWidth")
            assert wide <= WIDTHS[width]["width"], f"{name} scrolls sideways at {width}: {wide}"

        page.goto(f"{console}/signup")
        page.get_by_label("Email").fill(email)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign up").click()
        expect(page.get_by_role("heading", name="Welcome to DarkGPU")).to_be_visible()
        account_id = accounts.find_account(svc.db, email).id

        # keys: one that expires in 30 days, renamed in its row
        page.goto(f"{console}/keys")
        page.get_by_label("Name", exact=True).fill("ci")
        page.get_by_label("Expires").select_option("30")
        page.get_by_role("button", name="Create key").click()
        expect(page.locator("#new-key")).to_have_text(re.compile(r"^dgpu-"))
        row = page.locator("#keys-table tr", has=page.locator("input[value='ci']"))
        expect(row).to_contain_text("UTC")  # its expiry
        row.locator("input[name='name']").fill("ci-runner")
        row.get_by_role("button", name=re.compile("^Rename")).click()
        expect(page.get_by_role("status")).to_contain_text("is renamed")
        expect(page.locator("#keys-table input[value='ci-runner']")).to_have_count(1)
        shot("keys")

        # caps: the account's own daily cap, a key's, a customer's cap added then removed
        page.get_by_role("navigation", name="Console").get_by_role("link", name="Caps").click()
        page.get_by_label("Your own cap (tokens a day)").fill("50,000")
        page.get_by_role("button", name="Save", exact=True).click()
        expect(page.get_by_role("status")).to_contain_text("daily cap applies")
        expect(page.get_by_test_id("cap-applies")).to_have_text("50,000 tokens a day")
        page.get_by_label("Daily cap of key ci-runner").fill("5,000")
        page.get_by_role("button", name="Save the cap of key ci-runner").click()
        expect(page.get_by_role("status")).to_contain_text("key's daily cap applies")
        expect(page.get_by_label("Daily cap of key ci-runner")).to_have_value("5000")
        page.get_by_label("Customer (as in X-Customer-Id)").fill("acme")
        page.get_by_label("Tokens a day", exact=True).fill("2,000")
        page.get_by_role("button", name="Set the customer's cap").click()
        expect(page.locator("#customer-caps tr", has_text="acme")).to_contain_text("2,000")
        shot("caps")
        page.get_by_role("button", name="Remove the cap of acme").click()
        expect(page.locator("#customer-caps")).to_contain_text("No customer caps.")
        assert accounts.customer_caps(svc.db, account_id) == {}
        assert accounts.daily_caps(svc.db, svc.plans, account_id).own == 50_000

        # the account page: the low-balance email, then a new password
        page.get_by_role("navigation", name="Console").get_by_role("link", name="Account").click()
        page.get_by_label("Email me below (USD)").fill("5")
        page.get_by_role("button", name="Save").click()
        expect(page.get_by_test_id("threshold")).to_have_text("$5.00")
        page.get_by_label("Current password").fill(PASSWORD)
        page.get_by_label("New password").fill(NEW_PASSWORD)
        page.get_by_role("button", name="Change the password").click()
        expect(page.get_by_role("status")).to_contain_text("password is changed")
        shot("account")

        # a receipt of a purchase (paid, part refunded) from its billing history
        h = Harness(svc.db, svc.redis, svc.plans)
        paid = h.buy(account_id, "solo")
        h.deliver("charge.refunded", h.fake.refund(paid, 1500))
        page.goto(f"{console}/billing")
        page.get_by_role("link", name=re.compile(r"^DG-\d{6}$")).click()
        expect(page.get_by_test_id("amount")).to_have_text("$50.00 USD")
        expect(page.get_by_test_id("refunded")).to_have_text("$15.00 USD")
        expect(page.get_by_test_id("net")).to_have_text("$35.00 USD")
        shot("receipt")

        # a GPU: a new token, then removed
        page.goto(f"{console}/provider")
        page.get_by_label("GPU name").fill("rig")
        page.get_by_role("button", name="Add a GPU").click()
        first = page.locator("#provider-token").inner_text().strip()
        page.get_by_role("button", name="New token for rig").click()
        expect(page.locator("#provider-token")).not_to_have_text(first)
        expect(page.get_by_role("status")).to_contain_text("Every earlier token")
        expect(page.locator("#statements tr.statement-total")).to_have_count(8)
        shot("provider")

        # the operator approves the new GPU (this account made one of the operator's by the CLI)
        accounts.set_operator(svc.db, account_id=account_id, operator=True)
        page.get_by_role("navigation", name="Console").get_by_role("link", name="Account").click()
        page.get_by_role("link", name="review providers").click()
        row = page.locator("#providers tr", has_text="rig")
        expect(row.locator(".review")).to_have_text("pending")
        row.get_by_label("Note on rig").fill("owner known")
        row.get_by_role("button", name="Approve rig").click()
        expect(page.get_by_role("status")).to_contain_text("is approved")
        expect(page.locator("#providers tr", has_text="rig").locator(".review")).to_have_text(
            "approved"
        )
        shot("operator")
        page.goto(f"{console}/provider")
        page.get_by_role("button", name="Remove rig").click()
        expect(page.get_by_role("status")).to_contain_text("is removed")
        expect(page.locator("tr", has_text="rig").first).to_contain_text("removed")

        # sign out, forget the password, reset it by the mailed link
        page.get_by_role("button", name="Sign out").click()
        page.get_by_role("link", name="Forgot your password?").click()
        page.get_by_label("Email").fill(email)
        page.get_by_role("button", name="Send the link").click()
        expect(page.get_by_role("status")).to_contain_text("If an account uses that address")
        shot("reset")
        page.goto(reset_link(inbox, email))
        shot("reset-confirm")
        page.get_by_label("New password").fill("the third passphrase")
        page.get_by_role("button", name="Save the new password").click()
        expect(page.get_by_role("status")).to_contain_text("Your password is changed")
        page.get_by_label("Email").fill(email)
        page.get_by_label("Password").fill("the third passphrase")
        page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(f"{console}/overview")

        # the enterprise form on the public site
        page.goto(f"{served}/enterprise")
        page.get_by_label("Your name").fill("Ada Lovelace")
        page.get_by_label("Work email").fill("ada@example.com")
        page.get_by_label("Company").fill("Analytical Engines")
        page.get_by_label("What do you need?").fill("Two million tokens a day, please.")
        page.get_by_role("button", name="Send").click()
        expect(page.get_by_role("status")).to_contain_text("we have your message")
        shot("enterprise")
        context.close()
        browser.close()
