"""The one mapping of errors, through the app `create_app` builds: every class of the kernel's
exception tree (and the platform's own subclasses) answers the API in the OpenAI shape with
its status, type, code, param and headers; anything unexpected is a 500 that says nothing of
its cause; a console route shows the same errors as pages in words. Real SQLite and a real
Redis (`DARKGPU_TEST_REDIS_URL`) where a route needs them."""

from __future__ import annotations

import html
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import stripe
from fastapi import APIRouter
from fastapi.testclient import TestClient

from billing.checkout import AccountCannotBuy
from billing.connect import NoProviders
from billing.ledger import InsufficientFunds, LedgerError
from billing.signup import EmailTaken
from billing.stripe_client import PaymentsNotConfigured
from billing.webhooks import BadSignature
from cluster.catalog import CatalogError
from cluster.registry import ClusterNotReady, ProviderAuthError, ProviderNotFound
from core.db import migrate
from kernel.errors import (
    AuthError,
    BillingError,
    Conflict,
    DarkGpuError,
    Forbidden,
    InternalError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
)
from serve_app.console.web import PREFIX, ConsoleRoute, LoginRequired
from serve_app.errors import PAYMENT_PROVIDER_DOWN, UNEXPECTED
from serve_app.http_app import create_app
from serve_app.middleware import REQUEST_ID_HEADER
from serve_app.services import Services
from tests.billing.fake_stripe import API_KEY

REDIS_URL = os.environ.get("DARKGPU_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
SECRET = "ledger leg -5 on account 42 at /srv/darkgpu"  # what a 500 must never show

# (raised, status, type, code, param, headers the answer must carry)
CASES = [
    (InvalidRequest("Bad.", param="n", code="c"), 400, "invalid_request", "c", "n", {}),
    (PayloadTooLarge("Too big."), 413, "invalid_request", None, None, {}),
    (Conflict("Taken."), 409, "invalid_request", None, None, {}),
    (AuthError("Who?", code="invalid_api_key"), 401, "auth", "invalid_api_key", None, {}),
    (Forbidden("No."), 403, "auth", None, None, {}),
    (BillingError("Broke.", code="insufficient_credits"), 402, "billing",
     "insufficient_credits", None, {}),
    (NotFound("None.", param="model", code="model_not_found"), 404, "not_found",
     "model_not_found", "model", {}),
    (RateLimited("Slow.", code="daily_cap_exceeded", headers={"Retry-After": "60"}), 429,
     "rate_limit", "daily_cap_exceeded", None, {"retry-after": "60"}),
    (Unavailable("Later.", headers={"Retry-After": "10"}), 503, "service_unavailable", None,
     None, {"retry-after": "10"}),
    # the platform's own classes: each says its status and code where it is raised
    (EmailTaken("Taken.", param="email", code="email_taken"), 409, "invalid_request",
     "email_taken", "email", {}),
    (AccountCannotBuy("No.", code="account_inactive"), 403, "invalid_request",
     "account_inactive", None, {}),
    (InsufficientFunds("Broke."), 402, "billing", None, None, {}),
    (BadSignature("bad"), 400, "invalid_request", "invalid_signature", None, {}),
    (NoProviders("None."), 404, "not_found", "no_providers", None, {}),
    (PaymentsNotConfigured("Off."), 503, "service_unavailable", "payments_unavailable", None,
     {}),
    (ProviderAuthError("Who?", code="revoked_provider_token"), 401, "auth",
     "revoked_provider_token", None, {}),
    (ProviderNotFound("None."), 404, "not_found", "provider_not_found", None, {}),
    (ClusterNotReady("Later.", headers={"Retry-After": "30"}), 503, "service_unavailable",
     "cluster_not_ready", None, {"retry-after": "30"}),
]  # fmt: skip
HIDDEN = [  # broken invariants and the unexpected: one sentence, nothing of the cause
    InternalError(SECRET),
    LedgerError(SECRET),
    CatalogError(SECRET),
    RuntimeError(SECRET),
    KeyError(SECRET),
]


def _raising(errors: list[Exception]) -> APIRouter:
    """GET /raise/{i} raises errors[i] in an API route, GET /page/{i} in a console route (the
    console's route class; outside /console, whose catch-all comes first)."""
    router = APIRouter()

    def raise_it(i: int) -> None:
        raise errors[i]

    router.add_api_route("/raise/{i}", raise_it, methods=["GET"])
    router.add_api_route("/page/{i}", raise_it, methods=["GET"], route_class_override=ConsoleRoute)
    return router


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Services]:
    services = Services.create({"data_dir": str(tmp_path), "redis_url": REDIS_URL})
    yield services
    services.db.dispose()


def client(svc: Services, errors: list[Exception]) -> TestClient:
    app = create_app(svc, _raising(errors))
    return TestClient(
        app, base_url="https://127.0.0.1:8000", raise_server_exceptions=False,
        follow_redirects=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("error", "status", "kind", "code", "param", "headers"),
    CASES,
    ids=[type(case[0]).__name__ for case in CASES],
)
def test_each_error_class_answers_in_the_openai_shape(
    svc: Services,
    error: DarkGpuError,
    status: int,
    kind: str,
    code: str | None,
    param: str | None,
    headers: dict[str, str],
) -> None:
    answer = client(svc, [error]).get("/raise/0")
    assert answer.status_code == status
    assert answer.json() == {
        "error": {"message": error.message, "type": kind, "param": param, "code": code}
    }
    for name, value in headers.items():
        assert answer.headers[name] == value
    assert answer.headers[REQUEST_ID_HEADER].startswith("req_")


@pytest.mark.parametrize("error", HIDDEN, ids=[type(e).__name__ for e in HIDDEN])
def test_broken_invariants_and_unexpected_errors_are_a_plain_500(
    svc: Services, error: Exception
) -> None:
    answer = client(svc, [error]).get("/raise/0")
    assert answer.status_code == 500
    assert answer.json() == {
        "error": {"message": UNEXPECTED, "type": "internal_error", "param": None, "code": None}
    }
    assert "ledger leg" not in answer.text


def test_stripe_failing_is_a_503_to_retry(svc: Services) -> None:
    answer = client(svc, [stripe.APIConnectionError("connection reset")]).get("/raise/0")
    assert answer.status_code == 503
    assert answer.json()["error"] == {
        "message": PAYMENT_PROVIDER_DOWN,
        "type": "service_unavailable",
        "param": None,
        "code": "payments_unavailable",
    }


def test_framework_errors_keep_their_status_in_the_openai_shape(svc: Services) -> None:
    app = client(svc, [])
    unknown = app.get("/v1/nothing-here")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "Unknown route: GET /v1/nothing-here"
    assert unknown.json()["error"]["type"] == "not_found"
    wrong_method = app.post("/raise/0")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["type"] == "invalid_request"
    invalid = app.get("/raise/zero")
    assert invalid.status_code == 400
    assert invalid.json()["error"]["param"] == "path.i"


# --- the console: the same errors as pages --------------------------------------------------


def _page_message(page: str) -> str:
    found = re.search(r'<p class="msg error" role="alert">(.*?)</p>', page, re.S)
    assert found is not None, page
    return html.unescape(found[1].strip())


@pytest.mark.parametrize(
    ("error", "status"),
    [(case[0], case[1]) for case in CASES],
    ids=[type(case[0]).__name__ for case in CASES],
)
def test_a_console_route_shows_each_error_as_a_page(
    svc: Services, error: DarkGpuError, status: int
) -> None:
    page = client(svc, [error]).get("/page/0")
    assert page.status_code == status
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    assert _page_message(page.text) == error.message


def test_a_console_page_for_login_stripe_and_the_unexpected(svc: Services) -> None:
    pages = client(svc, [LoginRequired(), stripe.APIConnectionError("reset"), *HIDDEN])
    login = pages.get("/page/0")
    assert login.status_code == 303 and login.headers["location"] == f"{PREFIX}/login"
    down = pages.get("/page/1")
    assert down.status_code == 503 and _page_message(down.text) == PAYMENT_PROVIDER_DOWN
    for i in range(2, 2 + len(HIDDEN)):
        broken = pages.get(f"/page/{i}")
        assert broken.status_code == 500
        assert "Something went wrong on our side" in broken.text
        assert "ledger leg" not in broken.text


def test_a_real_console_route_shows_billings_error_without_translating_it(
    tmp_path: Path,
) -> None:
    """Checkout of an unknown bundle: `billing.checkout` raises, the console shows its words."""
    svc = Services.create(
        {"data_dir": str(tmp_path), "redis_url": REDIS_URL, "stripe_secret_key": API_KEY}
    )
    svc.redis.flushdb()
    migrate(svc.db)
    try:
        browser = client(svc, [])
        form = browser.get(f"{PREFIX}/signup")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert csrf is not None
        done = browser.post(
            f"{PREFIX}/signup",
            data={"email": "buyer@example.com", "password": "a long enough password",
                  "csrf_token": csrf[1]},
        )  # fmt: skip
        assert done.status_code == 200, done.text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', done.text)
        assert csrf is not None
        bought = browser.post(
            f"{PREFIX}/billing/checkout", data={"bundle": "gold", "csrf_token": csrf[1]}
        )
        assert bought.status_code == 400
        assert _page_message(bought.text).startswith("Unknown bundle 'gold'; bundles: ")
    finally:
        svc.redis.flushdb()
        svc.db.dispose()
