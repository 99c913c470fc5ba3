"""The console's routes in process: a FastAPI app holding only the console router, on real
SQLite and a real Redis (`DARKGPU_TEST_REDIS_URL`, flushed around each test). Sessions,
CSRF, sign-in refusals, one account never touching another's data, and errors as pages."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from billing.db import make_engine, migrate
from serve_app import console
from serve_app.console.sessions import COOKIE, MAX_LOGIN_FAILURES, SessionStore, digest
from serve_app.errors import install_error_handlers
from serve_app.services import Services

REDIS_URL = os.environ.get("DARKGPU_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PASSWORD = "correct horse battery staple"
HOST = "https://127.0.0.1:8000"  # Secure cookies travel over https (or to a browser's localhost)


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Services]:
    services = Services.create({"data_dir": str(tmp_path), "redis_url": REDIS_URL})
    services.redis.flushdb()
    migrate(services.db)
    yield services
    services.redis.flushdb()
    services.db.dispose()


@pytest.fixture
def app(svc: Services) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)  # the API's own handlers: the console must not need them
    app.include_router(console.router)
    app.state.services = svc
    return app


def client(app: FastAPI, base_url: str = HOST) -> TestClient:
    return TestClient(app, base_url=base_url, follow_redirects=False)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html)[1]


def signed_up(app: FastAPI, email: str) -> tuple[TestClient, str]:
    """A client signed in as a new account, and the session's CSRF token."""
    c = client(app)
    form = c.get("/console/signup")
    done = c.post("/console/signup", data={"email": email, "password": PASSWORD,
                                           "csrf_token": csrf_of(form.text)})  # fmt: skip
    assert done.status_code == 200, done.text
    return c, csrf_of(done.text)


def test_session_cookie_flags_and_only_the_hash_in_redis(app: FastAPI, svc: Services) -> None:
    c = client(app)
    page = c.get("/console/login")
    cookie = page.headers["set-cookie"]
    for flag in ("HttpOnly", "Secure", "SameSite=lax", "Path=/console"):
        assert flag in cookie
    token = c.cookies[COOKIE]
    keys = [k.decode() for k in svc.redis.keys("dg:console:*")]
    assert keys == [f"dg:console:session:{digest(token)}"]
    assert token.encode() not in b"".join(
        v for k in keys for v in svc.redis.hgetall(k).values()
    )  # fmt: skip
    assert 0 < svc.redis.ttl(keys[0]) <= 3600  # anonymous: an hour
    assert page.headers["cache-control"] == "no-store"
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_signup_shows_the_first_key_once_and_signs_in(app: FastAPI, svc: Services) -> None:
    c, _ = signed_up(app, "first@example.com")
    overview = c.get("/console/overview")
    assert overview.status_code == 200
    assert "$10.00" in overview.text and "first@example.com" in overview.text
    session_keys = svc.redis.keys("dg:console:session:*")
    assert len(session_keys) == 1  # the anonymous session was replaced, not kept
    assert 3600 < svc.redis.ttl(session_keys[0]) <= 12 * 3600
    keys = c.get("/console/keys")
    assert "dgpu-" in keys.text and 'id="new-key"' not in keys.text  # the prefix only


def test_forms_need_the_sessions_csrf_token_from_this_site(app: FastAPI, svc: Services) -> None:
    c, csrf = signed_up(app, "csrf@example.com")
    for data in (
        {"name": "x"},
        {"name": "x", "csrf_token": "wrong"},
        {"name": "x", "csrf_token": ""},
    ):
        refused = c.post("/console/keys", data=data)
        assert refused.status_code == 403
        assert "could not be verified" in refused.text
    foreign = c.post("/console/keys", data={"name": "x", "csrf_token": csrf},
                     headers={"origin": "https://evil.example"})  # fmt: skip
    assert foreign.status_code == 403
    other, other_csrf = signed_up(app, "other@example.com")  # another session's token
    assert c.post("/console/keys", data={"name": "x", "csrf_token": other_csrf}).status_code == 403
    assert "x" not in [m for m in re.findall(r"<td>([^<]+)</td>", c.get("/console/keys").text)]
    made = c.post("/console/keys", data={"name": "good", "csrf_token": csrf},
                  headers={"origin": HOST})  # fmt: skip
    assert made.status_code == 303  # post/redirect/get: a reload makes no second key
    stashed = svc.redis.keys("dg:console:reveal:*")
    assert len(stashed) == 1 and b"dgpu-" not in svc.redis.get(stashed[0])  # sealed
    shown = c.get(made.headers["location"])
    assert 'id="new-key"' in shown.text
    secret = re.search(r'id="new-key"[^>]*>\s*(dgpu-[^<\s]+)', shown.text)[1]
    assert svc.redis.keys("dg:console:reveal:*") == []  # read once, then gone
    again = c.get(made.headers["location"])  # the same page again: the key is gone
    assert 'id="new-key"' not in again.text and secret not in again.text
    no_session = client(app).post("/console/logout", data={"csrf_token": csrf})
    assert no_session.status_code == 403 and "session expired" in no_session.text
    json_body = c.post("/console/keys", json={"name": "x", "csrf_token": csrf})
    assert json_body.status_code == 415


def test_signed_out_and_anonymous_sessions_see_no_page(app: FastAPI) -> None:
    anonymous = client(app)
    anonymous.get("/console/login")  # an anonymous session, with a CSRF token
    pages = ("overview", "keys", "usage", "usage.csv", "billing", "models", "provider")
    for name in pages:
        answer = anonymous.get(f"/console/{name}")
        assert answer.status_code == 303 and answer.headers["location"] == "/console/login"
    c, csrf = signed_up(app, "leaving@example.com")
    token = c.cookies[COOKIE]
    out = c.post("/console/logout", data={"csrf_token": csrf})
    assert out.status_code == 303 and out.headers["location"].startswith("/console/login")
    replay = client(app)
    replay.cookies.set(COOKIE, token)
    for name in pages:
        assert replay.get(f"/console/{name}").status_code == 303


def test_wrong_password_is_told_in_words_and_throttled(app: FastAPI) -> None:
    signed_up(app, "pat@example.com")

    def login(email: str, password: str, c: TestClient | None = None):
        c = c or client(app)
        csrf = csrf_of(c.get("/console/login").text)
        return c.post("/console/login", data={"email": email, "password": password,
                                              "csrf_token": csrf})  # fmt: skip

    for email in ("pat@example.com", "nobody@example.com"):  # the same words for both
        wrong = login(email, "not the password")
        assert wrong.status_code == 400
        assert "That email and password do not match an account." in wrong.text
    c = client(app)
    ok = login("PAT@example.com", PASSWORD, c)
    assert ok.status_code == 303 and ok.headers["location"] == "/console/overview"
    assert c.get("/console/overview").status_code == 200
    for _ in range(MAX_LOGIN_FAILURES):
        login("pat@example.com", "guess")
    blocked = login("pat@example.com", PASSWORD)
    assert blocked.status_code == 400 and "Too many failed sign-ins" in blocked.text


def test_an_account_sees_and_revokes_only_its_own_keys(app: FastAPI) -> None:
    alice, alice_csrf = signed_up(app, "alice@example.com")
    bob, bob_csrf = signed_up(app, "bob@example.com")
    made = alice.post("/console/keys", data={"name": "alice-prod", "csrf_token": alice_csrf})
    key_id = re.search(r'data-key-id="(\d+)"', alice.get(made.headers["location"]).text)[1]
    assert "alice-prod" not in bob.get("/console/keys").text
    stolen = bob.post(f"/console/keys/{key_id}/revoke", data={"csrf_token": bob_csrf})
    assert stolen.status_code == 404 and "no such key" in stolen.text
    assert "Revoked" not in alice.get("/console/keys").text
    revoked = alice.post(f"/console/keys/{key_id}/revoke", data={"csrf_token": alice_csrf})
    assert revoked.status_code == 303
    assert "Revoked" in alice.get("/console/keys").text


def test_an_error_inside_a_route_is_a_page_in_words(app: FastAPI, svc: Services) -> None:
    c, _ = signed_up(app, "broken@example.com")
    svc.db = make_engine("sqlite:////nonexistent-dir/darkgpu.db")  # SQL is gone
    broken = c.get("/console/overview")
    assert broken.status_code == 500
    assert "Something went wrong on our side" in broken.text
    for leak in ("Traceback", "OperationalError", "sqlite", 'File "'):
        assert leak not in broken.text
    assert broken.headers["content-type"].startswith("text/html")
    unknown = c.get("/console/no-such-page")
    assert unknown.status_code == 404 and "no such page" in unknown.text
    bad = c.get("/console/usage?page=-3")
    assert bad.status_code == 400 and "“page”" in bad.text and "Traceback" not in bad.text


def test_plain_http_on_another_host_is_warned_about(app: FastAPI) -> None:
    remote = client(app, "http://10.1.2.3:8000").get("/console/login")
    assert "open the console over https" in remote.text
    local = client(app, "http://127.0.0.1:8000").get("/console/login")
    assert "open the console over https" not in local.text


def test_session_store(svc: Services) -> None:
    sessions = SessionStore(svc.redis)
    token, session = sessions.start(7, "seven@example.com")
    found = sessions.find(token)
    assert found == session and found.signed_in and found.email == "seven@example.com"
    assert found.csrf_ok(session.csrf)
    assert not found.csrf_ok(None) and not found.csrf_ok("") and not found.csrf_ok("x")
    assert sessions.find(token + "x") is None and sessions.find(None) is None
    sessions.end(found)
    assert sessions.find(token) is None
