"""The public site (`serve_app.site`) in process, on the app `create_app` builds around real
SQLite and a real Redis (`DARKGPU_TEST_REDIS_URL`), with the catalog a file of the test's
own: every page renders from the catalog and the plans (change them and the pages change),
needs no session, and links only to pages that exist. The calculator's and the storefront's
figures are checked against numbers worked out here by hand. The status page reads real
latency from a real metrics endpoint, or says "not yet measured". Stripe's return URLs (the
settings' defaults) are pages the platform serves. And the landing page, the calculator and
the storefront in Debian's Chromium at desktop and phone width (screenshots under the test's
tmp dir)."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import tomllib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Histogram, start_http_server

from core.db import migrate
from core.settings import RETURN_PATHS, Settings
from serve_app.catalog_file import catalog_of
from serve_app.http_app import create_app
from serve_app.ingress import model_card
from serve_app.services import Services
from serve_app.site import latency

REDIS_URL = os.environ.get("DARKGPU_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
HOST = "https://127.0.0.1:8000"  # the console's Secure cookies travel over https
PASSWORD = "correct horse battery staple"
PAGES = ("/", "/earnings", "/credits", "/quickstart", "/economics", "/faq", "/status")
# Two priced models of the test's own, a two-GPU one and the local one.
CATALOG = """
[[models]]
id = "alpha-8b"
source = "test/alpha"
input_usd_per_1m = "1.00"
output_usd_per_1m = "2.00"
min_vram_gb = 8
context_length = 4096
quantization = "fp16"
class = "standard"

[[models]]
id = "beta-30b"
source = "test/beta"
input_usd_per_1m = "2"
output_usd_per_1m = "6"
min_vram_gb = 24
context_length = 8192
quantization = "awq"
class = "premium"

[[models]]
id = "gamma-big"
source = "test/gamma"
input_usd_per_1m = "0.5"
output_usd_per_1m = "1"
min_vram_gb = 160
tensor_parallel_size = 2
context_length = 8192
quantization = "fp8"
class = "premium"

[[models]]
id = "tiny-local"
source = "local:tiny"
input_usd_per_1m = "0.015"
output_usd_per_1m = "0.06"
min_vram_gb = 0
context_length = 256
quantization = "bf16"
class = "local"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def models_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(CATALOG)
    return path


def make_services(tmp_path: Path, models_file: Path, **settings: Any) -> Services:
    services = Services.create({
        "data_dir": str(tmp_path), "redis_url": REDIS_URL, "state_redis_url": REDIS_URL,
        "models_file": str(models_file), "metrics_port": free_port(), **settings,
    })  # fmt: skip
    services.redis.flushdb()
    migrate(services.db)
    return services


@pytest.fixture
def svc(tmp_path: Path, models_file: Path) -> Iterator[Services]:
    services = make_services(tmp_path, models_file)
    yield services
    services.redis.flushdb()
    services.db.dispose()


@pytest.fixture
def app(svc: Services) -> FastAPI:
    return create_app(svc)


def client(app: FastAPI, base_url: str = HOST) -> TestClient:
    return TestClient(app, base_url=base_url, follow_redirects=False)


def text_of(html: str) -> str:
    """The page's words, tags gone and spaces collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&amp;", "&").strip()


def row(html: str, model: str, within: str | None = None) -> str:
    """The words of the table row of `model` (in the table whose tag has `within`)."""
    if within is not None:
        html = html[html.index(within) :]
        html = html[: html.index("</table>")]
    found = re.search(rf'<tr data-model="{re.escape(model)}">(.*?)</tr>', html, re.S)
    assert found, f"no row for {model}"
    return text_of(found[1])


# --- the pages ------------------------------------------------------------------------------


def test_pages_render_from_the_catalog_and_follow_its_changes(
    app: FastAPI, models_file: Path
) -> None:
    c = client(app)
    landing = c.get("/")
    assert landing.status_code == 200
    assert row(landing.text, "alpha-8b").startswith("alpha-8b standard $1.00 $2.00 4,096 8 GB")
    assert "beta-30b premium $2.00 $6.00 8,192 24 GB" in row(landing.text, "beta-30b")
    assert "(2 GPUs)" in row(landing.text, "gamma-big")
    assert 'data-model="tiny-local"' not in landing.text  # local: listed only where served
    assert "qwen3.5-7b" not in landing.text  # nothing from the repository's own catalog
    assert "4 models" not in landing.text and "3 models" in landing.text

    # the operator edits the catalog: a price changes, a model arrives, one leaves
    models_file.write_text(
        CATALOG.replace('output_usd_per_1m = "2.00"', 'output_usd_per_1m = "2.50"').replace(
            'id = "beta-30b"', 'id = "delta-30b"'
        )
    )
    os.utime(models_file, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime, surely
    again = c.get("/").text
    assert "alpha-8b standard $1.00 $2.50" in row(again, "alpha-8b")
    assert 'data-model="delta-30b"' in again and 'data-model="beta-30b"' not in again
    earnings = c.get("/earnings?gpu=24").text
    assert 'data-model="delta-30b"' in earnings and "$1.00 / $2.50" in row(earnings, "alpha-8b")
    # the storefront's dearest price moved with it: the $50 bundle now buys 50 / 6e-6 tokens
    credits = c.get("/credits").text
    assert "delta-30b" in credits and "8,333,333" in credits


def test_calculator_defaults_to_conservative_and_shows_its_assumptions(app: FastAPI) -> None:
    c = client(app)
    page = c.get("/earnings")
    assert page.status_code == 200
    assert re.search(r'<option value="conservative" selected>', page.text)
    words = text_of(page.text)
    for stated in ("10% of the day serving requests", "50 generated tokens/s for a model that "
                   "needs 8 GB", "3 per generated token", "95% of what the requests cost",
                   "30 days", "2,000, 7,000, 15,000 tokens per customer"):  # fmt: skip
        assert stated in words, stated
    # alpha-8b (in $1, out $2 per 1M) at 50 tok/s for 10% of the day: 432,000 tokens out and
    # 1,296,000 in a day = $0.864 + $1.296 = $2.16, of which 95%: $2.052 a day, $61.56 a month
    assert row(page.text, "alpha-8b", 'data-gpu="8"') == (
        "alpha-8b $1.00 / $2.00 50 432,000 + 1,296,000 $2.16 $2.05 $61.56"
    )
    # beta-30b needs 24 GB: 50 × 8 / 24 = 16 tok/s; 138,240 out and 414,720 in a day:
    # $0.82944 + $0.82944 = $1.65888, 95% a day $1.575936, a month $47.27808
    assert row(page.text, "beta-30b", 'data-gpu="24"') == (
        "beta-30b $2.00 / $6.00 16 138,240 + 414,720 $1.65 $1.57 $47.27"
    )
    assert 'data-model="beta-30b"' not in page.text.split('data-gpu="16"')[1].split("</table>")[0]
    # two GPUs' worth (tensor parallel) and the local model are never on one card
    assert 'data-model="gamma-big"' not in page.text and "tiny-local" not in page.text
    # optimistic: 50% of the day at 200 tok/s: 8,640,000 out, 25,920,000 in: $43.20 a day,
    # 95%: $41.04, a month $1,231.20
    optimistic = c.get("/earnings", params={"tier": "optimistic", "gpu": 8})
    assert row(optimistic.text, "alpha-8b") == (
        "alpha-8b $1.00 / $2.00 200 8,640,000 + 25,920,000 $43.20 $41.04 $1,231.20"
    )
    assert 'data-gpu="24"' not in optimistic.text  # only the chosen size
    for wrong in ({"tier": "lucky"}, {"gpu": 7}):
        refused = c.get("/earnings", params=wrong)
        assert refused.status_code == 404 and "<h1>" in refused.text  # a page, in words


def test_storefront_figures_come_from_the_plans_and_the_catalog(
    app: FastAPI, svc: Services
) -> None:
    page = client(app).get("/credits").text
    names = re.findall(r'data-bundle="([a-z]+)"', page)
    assert names == sorted(svc.plans.bundles, key=lambda n: svc.plans.bundles[n].price_nusd)
    assert names == ["solo", "team", "scale"]
    solo = text_of(page.split('data-bundle="solo">')[1].split("</section>")[0])
    # $50 at the dearest price (beta-30b's $6 per 1M) and at the cheapest model's dearer one
    # (gamma-big's $1): 8,333,333 to 50,000,000 tokens. Cap 2,000 tokens: 2 requests of 800,
    # at most 2,000 × $6 / 1M = $0.012 a day.
    assert solo == (
        "Solo $50.00 Tokens included 8,333,333 to 50,000,000 "
        "Daily cap, if you choose a capped budget 2,000 tokens/day "
        "Requests a day (example) ~2 Most a day can cost $0.012 Buy Solo"
    )
    scale = text_of(page.split('data-bundle="scale">')[1].split("</section>")[0])
    assert "15,000 tokens/day" in scale and "~18" in scale and "$0.09" in scale
    assert "beta-30b" in page


def test_status_page_says_not_yet_measured_without_measurements(app: FastAPI) -> None:
    page = client(app).get("/status")
    assert page.status_code == 200
    for model in ("alpha-8b", "beta-30b", "gamma-big"):
        assert row(page.text, model) == f"{model} unknown not yet measured not yet measured"
    assert "No measurements are available right now." in page.text
    assert "This server does not run the API" in page.text


def test_status_shows_availability_and_latency_as_measured(
    tmp_path: Path, models_file: Path
) -> None:
    registry = CollectorRegistry()  # exported as Ray's metrics agent names them
    ttft = Histogram(latency.TIME_TO_FIRST_TOKEN, "ttft", ["model", "replica"],
                     buckets=[0.01, 0.05, 0.25, 1], registry=registry)  # fmt: skip
    whole = Histogram(latency.REQUEST_LATENCY, "latency", ["endpoint", "model"],
                      buckets=[0.01, 0.05, 0.25, 1], registry=registry)  # fmt: skip
    for seconds, replica in ((0.03, "a"), (0.04, "b"), (0.2, "b")):  # summed over replicas
        ttft.labels(model="alpha-8b", replica=replica).observe(seconds)
    for seconds in (0.2, 0.3, 0.5, 0.9):
        whole.labels(endpoint="chat", model="alpha-8b").observe(seconds)
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    svc = make_services(tmp_path, models_file, metrics_port=port)
    catalog = catalog_of(svc)

    async def cards() -> list[dict[str, Any]]:  # what the ingress answers: one model online
        served = ("alpha-8b", "beta-30b", "tiny-local")
        return [model_card(catalog.by_id[m], m == "alpha-8b", 0) for m in served]

    try:
        page = client(create_app(svc, model_cards=cards)).get("/status").text
    finally:
        server.shutdown()
        svc.db.dispose()
    # 3 first tokens (0.03, 0.04, 0.2): the 2nd is the median, in the 0.05 bucket; 4 whole
    # requests (0.2, 0.3, 0.5, 0.9): half of them have ended only by the 1 s bound
    assert row(page, "alpha-8b") == (
        "alpha-8b yes under 0.05 s (3 requests) under 1 s (4 requests)"
    )
    assert row(page, "beta-30b") == "beta-30b no provider online not yet measured not yet measured"
    assert "tiny-local" in page  # served here, so listed
    assert 'data-model="gamma-big"' not in page  # not served by this ingress
    assert "This server does not run the API" not in page


def test_no_page_needs_a_session_and_every_link_resolves(app: FastAPI, svc: Services) -> None:
    """Crawl from `/` with a client that has never signed in: every page the site links to
    (its own and the console's) answers 200, following redirects; the site's pages set no
    cookie and store nothing."""
    seen: dict[str, int] = {}
    todo = list(PAGES)
    c = client(app)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        answer = c.get(path)
        if answer.is_redirect:  # the console's signed-in pages send a visitor to sign in
            target = answer.headers["location"]
            assert target == "/console/login", (path, target)
            answer = c.get(target)
        seen[path] = answer.status_code
        assert answer.status_code == 200, (path, answer.status_code)
        if path.startswith("/console"):
            continue  # the console's own links are its tests' business
        assert "set-cookie" not in answer.headers, path
        assert "cheaper" not in answer.text, path  # no "40–60% cheaper" without its figures
        for link in links(answer.text):
            url = urlsplit(urljoin(HOST + path, link))
            if url.netloc and url.netloc != urlsplit(HOST).netloc:
                continue
            target = url.path + (f"?{url.query}" if url.query else "")
            todo.append(target)
    for page in PAGES:
        assert seen[page] == 200
    assert {"/console/signup", "/console/login", "/console/billing"} <= set(seen)
    assert "/site/static/site.css" in seen and "/console/static/console.css" in seen
    assert any(p.startswith("/earnings?tier=") for p in seen)
    assert svc.redis.keys("dg:console:session:*") == []


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {"a": "href", "link": "href", "form": "action", "script": "src", "img": "src"}
        for name, value in attrs:
            if name == names.get(tag) and value and not value.startswith(("#", "mailto:")):
                self.found.append(value.split("#")[0])


def links(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.found


def test_quickstart_names_this_platform(app: FastAPI, tmp_path: Path, models_file: Path) -> None:
    page = client(app, "http://127.0.0.1:8123").get("/quickstart").text
    assert 'base_url="http://127.0.0.1:8123/v1"' in page
    assert 'model="alpha-8b"' in page  # no ingress: the first listed model
    public = make_services(tmp_path / "p", models_file, public_url="https://gpu.example.org/")
    try:
        page = client(create_app(public)).get("/quickstart").text
    finally:
        public.db.dispose()
    assert 'base_url="https://gpu.example.org/v1"' in page
    assert "api.darkgpu.ai" not in page


# --- Stripe's return URLs ---------------------------------------------------------------------


def signed_in(app: FastAPI) -> TestClient:
    c = client(app)
    form = c.get("/console/signup")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)[1]
    done = c.post("/console/signup", data={"email": "back@example.com", "password": PASSWORD,
                                           "csrf_token": csrf})  # fmt: skip
    assert done.status_code == 200, done.text
    return c


RETURNS = {
    "checkout_success_url": "the credits are added as soon as Stripe confirms the payment",
    "checkout_cancel_url": "The checkout was cancelled; nothing was charged.",
    "connect_return_url": "Back from Stripe: payouts start once Stripe confirms the account.",
    "connect_refresh_url": "The onboarding link expired; start again below.",
}


def test_stripe_return_urls_are_pages_of_this_platform(app: FastAPI, svc: Services) -> None:
    assert set(RETURNS) == set(RETURN_PATHS)
    c = signed_in(app)
    for name, says in RETURNS.items():
        url = urlsplit(getattr(Settings(), name))
        assert (url.scheme, url.netloc) == ("http", "127.0.0.1:8000"), name  # this platform
        target = url.path + "?" + url.query.replace("{CHECKOUT_SESSION_ID}", "cs_test_1")
        answer = c.get(target)
        assert answer.status_code == 200, (name, target, answer.status_code)
        assert says in answer.text, name
        # a browser no longer signed in is told what happened too, and where to sign in
        signed_out = client(app).get(target)
        assert signed_out.status_code == 200, (name, signed_out.status_code)
        assert says.replace("below", "on the Provider page") in signed_out.text, name
        assert 'href="/console/login"' in signed_out.text
        assert "set-cookie" not in signed_out.headers  # nothing stored for it
    for page in ("/console/billing", "/console/provider", "/console/billing?checkout=other"):
        assert client(app).get(page).headers["location"] == "/console/login"
    public = Settings(public_url="https://gpu.example.org/", http_port=9000)
    assert (
        public.checkout_cancel_url == "https://gpu.example.org/console/billing?checkout=cancelled"
    )
    assert Settings(connect_return_url="https://x.test/r").connect_return_url == "https://x.test/r"


def test_provider_page_asks_for_the_python_the_installer_requires(app: FastAPI) -> None:
    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    version = project["requires-python"].removeprefix(">=")  # "3.11"
    installer = (root / "agent_bootstrap" / "install.sh").read_text()
    assert f"Python {version} or newer is needed" in installer
    page = signed_in(app).get("/console/provider")
    assert page.status_code == 200
    assert re.findall(r"Python (3\.\d+)\+", page.text) == [version]


# --- in the browser ---------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
WIDTHS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}


@pytest.fixture
def served(app: FastAPI) -> Iterator[str]:
    """The app on a real HTTP server, as a browser reaches it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the test server never started"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")
@pytest.mark.parametrize("width", list(WIDTHS))
def test_landing_calculator_and_storefront_in_the_browser(
    served: str, width: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport=WIDTHS[width], java_script_enabled=False)
        page = context.new_page()

        def fits_the_screen(name: str) -> None:
            page.screenshot(path=str(shots / f"{name}-{width}.png"), full_page=True)
            wide = page.evaluate("document.documentElement.scrollWidth")
            assert wide <= WIDTHS[width]["width"], f"{name} scrolls sideways at {width}: {wide}"

        page.goto(served + "/")
        expect(page.get_by_role("heading", level=1)).to_contain_text("OpenAI-compatible")
        expect(page.locator("#prices tr[data-model='alpha-8b']")).to_contain_text("$2.00")
        sign_up = page.get_by_role("main").get_by_role("link", name=re.compile("^Sign up"))
        expect(sign_up).to_have_text("Sign up: $10.00 of free credits")
        expect(sign_up).to_have_attribute("href", "/console/signup")
        fits_the_screen("landing")

        # the calculator without a script: choose, submit, and the server recomputes
        page.get_by_role("navigation", name="Site").get_by_role(
            "link", name="Earnings calculator"
        ).click()
        expect(page.get_by_label("Tier")).to_have_value("conservative")
        alpha = page.locator("table[data-gpu='8'] tr[data-model='alpha-8b'] .month")
        expect(alpha).to_have_text("$61.56")
        fits_the_screen("calculator")
        page.get_by_label("Tier").select_option("optimistic")
        page.get_by_label("GPU memory").select_option("8")
        page.get_by_role("button", name="Calculate").click()
        expect(page).to_have_url(re.compile(r"/earnings\?tier=optimistic&gpu=8$"))
        expect(alpha).to_have_text("$1,231.20")
        expect(page.get_by_test_id("utilisation")).to_have_text("50% of the day serving requests")
        fits_the_screen("calculator-optimistic")

        page.get_by_role("navigation", name="Site").get_by_role("link", name="Credits").click()
        solo = page.locator("[data-bundle='solo']")
        expect(solo.locator(".max-spend")).to_have_text("$0.012")
        expect(solo.get_by_role("link", name="Buy Solo")).to_be_visible()
        fits_the_screen("credits")
        solo.get_by_role("link", name="Buy Solo").click()  # an account first
        expect(page).to_have_url(re.compile(r"/console/login$"))
        context.close()
        browser.close()
    print(f"screenshots: {shots}")
