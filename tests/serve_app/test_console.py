"""The web console in a real browser (Debian's Chromium, driven by Playwright) against the
real platform (`darkgpu up`): sign up, see the $10, make a key, call the API with it through
the OpenAI SDK, find the request in Usage, revoke the key and get 401. Screenshots of every
page go to `artifacts/console/` (desktop, and phone width for some)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.billing.fake_stripe import WEBHOOK_SECRET, signed

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium's own connections are refused on these
# machines' closed network.
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "console"
PHONE = {"width": 390, "height": 844}
PASSWORD = "correct horse battery staple"
LOCAL = "darkgpu-tiny"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    yield context.new_page()
    context.close()


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def console_url(platform) -> str:
    return platform.api_url.removesuffix("/v1") + "/console"


def nav(page: Page, name: str) -> None:
    page.get_by_role("navigation", name="Console").get_by_role("link", name=name).click()


def sign_up(page: Page, console: str, email: str) -> None:
    page.goto(f"{console}/signup")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()


def test_sign_up_key_call_usage_revoke(platform, page: Page) -> None:
    console = console_url(platform)

    # sign up → the $10 of free credits, and the first key shown once
    page.goto(f"{console}/signup")
    page.keyboard.press("Tab")  # keyboard users land on the skip link first
    expect(page.locator(":focus")).to_have_text("Skip to content")
    shot(page, "signup")
    sign_up(page, console, "browser@example.com")
    expect(page.get_by_role("heading", name="Welcome to DarkGPU")).to_be_visible()
    expect(page.locator(".balance")).to_have_text("$10.00")
    expect(page.locator("#first-key")).to_have_text(re.compile(r"^dgpu-"))
    shot(page, "welcome")

    page.get_by_role("link", name="Continue to the overview").click()
    expect(page.get_by_test_id("balance")).to_have_text("$10.00")
    expect(page.locator(".plan")).to_have_text("free")
    expect(page.get_by_text("200,000", exact=False)).to_be_visible()  # the free daily cap
    shot(page, "overview")

    # a new key: shown once, with a working copy button
    nav(page, "API keys")
    page.get_by_label("Name", exact=True).fill("e2e")
    page.get_by_role("button", name="Create key").click()
    key = page.locator("#new-key").inner_text().strip()
    assert key.startswith("dgpu-")
    page.locator("button[data-copy='new-key']").click()
    expect(page.locator("button[data-copy='new-key']")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == key
    shot(page, "keys")
    page.reload()  # the key is never shown again
    expect(page.locator("#new-key")).to_have_count(0)
    assert key not in page.content()

    # the API with that key, through the OpenAI SDK
    client = openai.OpenAI(base_url=platform.api_url, api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=LOCAL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=4,
        extra_headers={"X-Customer-Id": "acme"},
    )
    request_id = raw.headers["x-darkgpu-request-id"]
    assert raw.parse().usage.total_tokens > 0

    # the request in Usage once the billing actor has written it to the ledger
    nav(page, "Usage")
    deadline = time.monotonic() + 90
    while request_id not in page.locator("#ledger-table").inner_text():
        assert time.monotonic() < deadline, "the request never reached the usage ledger"
        page.wait_for_timeout(1000)
        page.reload()
    row = page.locator("#ledger-table tr", has_text=request_id)
    expect(row).to_contain_text(LOCAL)
    expect(row).to_contain_text("acme")
    shot(page, "usage")

    # the same numbers as /v1/usage, for the range the page names
    api_query = page.locator("code", has_text="/v1/usage?").inner_text().split("?", 1)[1]
    answer = httpx.get(f"{platform.api_url}/usage?{api_query}",
                       headers={"authorization": f"Bearer {key}"}, timeout=30)  # fmt: skip
    assert answer.status_code == 200, answer.text
    requests = sum(r["requests"] for r in answer.json()["data"])
    expect(page.get_by_test_id("total-requests")).to_have_text(str(requests))

    # the CSV export of the same rows
    with page.expect_download() as download:
        page.get_by_role("link", name="Download CSV").click()
    csv_text = Path(download.value.path()).read_text()
    assert csv_text.startswith("request_id,") and request_id in csv_text

    # models, billing (Checkout redirect), provider pages
    nav(page, "Models")
    expect(page.locator("tr", has_text=LOCAL)).to_contain_text("Yes")
    shot(page, "models")

    nav(page, "Billing")
    expect(page.get_by_text("Credits are prepaid and non-refundable.")).to_be_visible()
    page.route("https://checkout.stripe.com/**",
               lambda route: route.fulfill(body="<h1>Stripe Checkout</h1>",
                                           content_type="text/html"))  # fmt: skip
    solo = page.locator("section.card", has=page.get_by_role("heading", name="Solo"))
    solo.get_by_label("Capped budget").check()  # the storefront's promise: a daily cap
    page.get_by_role("button", name="Buy Solo").click()
    page.wait_for_url("https://checkout.stripe.com/**")
    session_id = page.url.rstrip("/").rsplit("/", 1)[1]
    event = platform.stripe.event("checkout.session.completed", platform.stripe.pay(session_id))
    signature = {"stripe-signature": signed(event, WEBHOOK_SECRET)}
    paid = httpx.post(f"{platform.api_url}/billing/stripe/webhook", content=event,
                      headers=signature, timeout=30)  # fmt: skip
    assert paid.status_code == 200, paid.text
    page.goto(f"{console}/billing?checkout=success")
    expect(page.locator("tr", has_text="Solo")).to_contain_text("paid")
    expect(page.locator("tr", has_text="Solo")).to_contain_text("$50.00")
    credits = httpx.get(f"{platform.api_url}/credits", timeout=30,
                        headers={"authorization": f"Bearer {key}"}).json()  # fmt: skip
    assert (credits["plan"], credits["tokens_per_day"]) == ("paid", 2000)  # as it chose
    shot(page, "billing")

    nav(page, "Provider")
    page.get_by_label("GPU name").fill("garage-4090")
    page.get_by_role("button", name="Add a GPU").click()
    expect(page.locator("#provider-token")).to_have_text(re.compile(r"^dgpp-"))
    expect(page.locator("tr", has_text="garage-4090")).to_contain_text("offline")
    page.reload()  # the token is never shown again, and no second GPU is added
    expect(page.locator("#provider-token")).to_have_count(0)
    expect(page.locator("tr", has_text="garage-4090")).to_have_count(1)
    base = platform.api_url.removesuffix("/v1")  # the installer this platform serves
    expect(page.get_by_text(f"curl -fsSL {base}/install.sh | bash")).to_be_visible()
    shot(page, "provider")

    # phone width
    page.set_viewport_size(PHONE)
    for name in ("overview", "keys", "usage"):
        page.goto(f"{console}/{name}")
        shot(page, f"{name}-phone")
    page.set_viewport_size({"width": 1280, "height": 900})

    # revoke the key → the next call gets 401
    page.goto(f"{console}/keys")
    page.get_by_role("button", name="Revoke key e2e").click()
    expect(page.get_by_role("status")).to_contain_text("revoked")
    expect(page.locator("tr", has_text="e2e")).to_contain_text("Revoked")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(
            model=LOCAL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4
        )


def test_csrf_sign_out_and_wrong_password(platform, page: Page) -> None:
    console = console_url(platform)
    sign_up(page, console, "careful@example.com")
    page.goto(f"{console}/keys")

    def post_keys(token: str | None) -> dict:
        fields = {"name": "forged"} if token is None else {"name": "forged", "csrf_token": token}
        return page.evaluate(
            """async (fields) => {
                const body = new URLSearchParams(fields);
                const r = await fetch(location.pathname, {method: "POST", body});
                return {status: r.status, text: await r.text()};
            }""",
            fields,
        )

    for token in (None, "not-the-token"):  # same origin, with the session cookie: still refused
        refused = post_keys(token)
        assert refused["status"] == 403
        assert "could not be verified" in refused["text"] and "Traceback" not in refused["text"]
    page.reload()
    expect(page.locator("tr", has_text="forged")).to_have_count(0)

    # sign out: the session is gone, its cookie no longer opens any page
    cookies = page.context.cookies()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("status")).to_have_text("You are signed out.")
    page.context.add_cookies(cookies)  # the old session's cookie, replayed
    for name in ("overview", "keys", "usage", "billing", "models", "provider"):
        page.goto(f"{console}/{name}")
        expect(page).to_have_url(f"{console}/login")

    # a wrong password is told in words; the right one signs in
    page.get_by_label("Email").fill("careful@example.com")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text(
        "That email and password do not match an account."
    )
    shot(page, "login-error")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{console}/overview")
    expect(page.get_by_test_id("balance")).to_have_text("$10.00")

    # a bad value in a page's query is a page in words, not a trace
    page.goto(f"{console}/usage?start=yesterday")
    expect(page.get_by_role("alert")).to_have_text("The start date must look like 2026-11-25.")
    page.goto(f"{console}/usage?page=zero")
    expect(page.get_by_role("alert")).to_contain_text("“page”")
    assert "Traceback" not in page.content()
