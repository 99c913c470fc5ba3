"""The console's routes in process: the app `create_app` builds (no ingress), on real
SQLite and a real Redis (`DARKGPU_TEST_REDIS_URL`, flushed around each test). Sessions,
CSRF, sign-in refusals, one account never touching another's data, and errors as pages."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from httpx import Response
from typer.testing import CliRunner

from billing import accounts
from billing.cli import app as cli_app
from core.db import make_engine, migrate
from serve_app.console.sessions import (
    COOKIE,
    CSRF_COOKIE,
    MAX_LOGIN_FAILURES,
    SessionStore,
    digest,
)
from serve_app.http_app import create_app
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
    return create_app(svc)  # the API's routes and handlers too: the console must not need them


def client(app: FastAPI, base_url: str = HOST, ip: str = "testclient") -> TestClient:
    return TestClient(app, base_url=base_url, follow_redirects=False, client=(ip, 50000))


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


def test_anonymous_views_store_nothing_and_sessions_only_their_hash(
    app: FastAPI, svc: Services
) -> None:
    for _ in range(5):  # cookieless views of the forms: nothing stored per view
        page = client(app).get("/console/login")
        assert client(app).get("/console/signup").status_code == 200
    assert svc.redis.keys("dg:console:*") == [b"dg:console:secret"]  # the one CSRF secret
    assert 0 < svc.redis.ttl("dg:console:secret") <= 30 * 24 * 3600
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(f"{CSRF_COOKIE}=") and COOKIE not in cookie
    for flag in ("HttpOnly", "Secure", "SameSite=lax", "Path=/console"):
        assert flag in cookie
    assert page.headers["cache-control"] == "no-store"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    c, _ = signed_up(app, "hash@example.com")  # the first thing stored: a signed-in session
    token = c.cookies[COOKIE]
    keys = [k.decode() for k in svc.redis.keys("dg:console:session:*")]
    assert keys == [f"dg:console:session:{digest(token)}"]
    assert token.encode() not in b"".join(svc.redis.hgetall(keys[0]).values())
    for key in svc.redis.keys("dg:console:*") + svc.redis.keys("dg:throttle:*"):
        assert svc.redis.ttl(key) > 0, key  # nothing that is not money lives forever


def test_anonymous_forms_need_the_signed_token_of_their_cookie(app: FastAPI) -> None:
    signed_up(app, "anon@example.com")
    c = client(app)
    csrf = csrf_of(c.get("/console/login").text)
    data = {"email": "anon@example.com", "password": PASSWORD}
    other = client(app)
    other_csrf = csrf_of(other.get("/console/login").text)  # another visitor's pair
    for token in ("", "x", other_csrf, c.cookies[CSRF_COOKIE]):
        refused = c.post("/console/login", data={**data, "csrf_token": token})
        assert refused.status_code == 403 and "could not be verified" in refused.text
    forged = client(app)  # a cookie of the attacker's choosing, without the server's secret
    forged.cookies.set(CSRF_COOKIE, "chosen-nonce", path="/console")
    refused = forged.post("/console/login", data={**data, "csrf_token": csrf})
    assert refused.status_code == 403
    ok = c.post("/console/login", data={**data, "csrf_token": csrf})
    assert ok.status_code == 303 and ok.headers["location"] == "/console/overview"


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


def login_from(app: FastAPI, ip: str, email: str, password: str) -> Response:
    c = client(app, ip=ip)
    csrf = csrf_of(c.get("/console/login").text)
    return c.post("/console/login", data={"email": email, "password": password,
                                          "csrf_token": csrf})  # fmt: skip


def test_failed_sign_ins_lock_the_email_only_from_their_network(app: FastAPI) -> None:
    signed_up(app, "victim@example.com")
    for _ in range(MAX_LOGIN_FAILURES):
        assert login_from(app, "203.0.113.5", "victim@example.com", "guess").status_code == 400
    for ip in ("203.0.113.5", "203.0.113.200"):  # the attacker's /24: locked there
        blocked = login_from(app, ip, "victim@example.com", PASSWORD)
        assert blocked.status_code == 400 and "Too many failed sign-ins" in blocked.text
    ok = login_from(app, "198.51.100.7", "victim@example.com", PASSWORD)  # the victim, elsewhere
    assert ok.status_code == 303 and ok.headers["location"] == "/console/overview"


def test_sign_in_and_sign_up_are_throttled_per_ip_before_hashing(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(svc.settings, "signin_limit_per_ip", 3)
    monkeypatch.setattr(svc.settings, "signup_limit_per_ip", 1)
    app = create_app(svc)
    signed_up(app, "someone@example.com")
    for _ in range(3):
        assert login_from(app, "203.0.113.5", "someone@example.com", "guess").status_code == 400
    throttled = login_from(app, "203.0.113.5", "someone@example.com", PASSWORD)
    assert throttled.status_code == 429 and 0 < int(throttled.headers["retry-after"]) <= 900
    assert "Too many sign-in attempts from your network" in throttled.text
    assert 'name="csrf_token"' in throttled.text  # the form again, in words
    assert login_from(app, "198.51.100.7", "someone@example.com", PASSWORD).status_code == 303
    c = client(app, ip="192.0.2.1")
    form = {"password": PASSWORD, "csrf_token": csrf_of(c.get("/console/signup").text)}
    assert c.post("/console/signup", data={**form, "email": "one@example.com"}).status_code == 200
    c = client(app, ip="192.0.2.1")
    form["csrf_token"] = csrf_of(c.get("/console/signup").text)
    again = c.post("/console/signup", data={**form, "email": "two@example.com"})
    assert again.status_code == 429 and "Too many sign-ups" in again.text
    assert accounts.find_account(svc.db, "two@example.com") is None


def test_suspending_an_account_ends_its_sessions_and_refuses_its_keys(
    app: FastAPI, svc: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c, _ = signed_up(app, "gone@example.com")
    second = client(app)  # the same account signed in a second time, elsewhere
    csrf = csrf_of(second.get("/console/login").text)
    data = {"email": "gone@example.com", "password": PASSWORD}
    signed_in = second.post("/console/login", data={**data, "csrf_token": csrf})
    assert signed_in.status_code == 303
    other, _ = signed_up(app, "stays@example.com")
    account_id = accounts.find_account(svc.db, "gone@example.com").id
    api_key = accounts.create_key(svc.db, svc.redis, account_id=account_id, name="k").key
    auth = {"authorization": f"Bearer {api_key}"}
    with TestClient(app) as api:  # one event loop for admission's async Redis
        before = api.get("/v1/providers/me/earnings", headers=auth)
        assert before.status_code == 404 and "owns no providers" in before.text  # it works

        monkeypatch.setenv("DARKGPU_DATA_DIR", str(tmp_path))
        monkeypatch.setenv("DARKGPU_REDIS_URL", REDIS_URL)
        done = CliRunner().invoke(cli_app, ["account", "suspend", "--account", str(account_id)])
        assert done.exit_code == 0, done.output
        shown = json.loads(done.stdout)
        assert shown["status"] == "suspended" and shown["console_sessions_ended"] == 2

        for browser in (c, second):
            assert browser.get("/console/overview").status_code == 303  # signed out
        assert other.get("/console/overview").status_code == 200  # another account's stays
        after = api.get("/v1/providers/me/earnings", headers=auth)
        assert after.status_code == 401 and after.json()["error"]["type"] == "auth", after.text
    assert svc.redis.keys(f"dg:console:acct:{account_id}") == []
    login = client(app)
    csrf = csrf_of(login.get("/console/login").text)
    again = login.post("/console/login", data={**data, "csrf_token": csrf})
    assert again.status_code == 400 and "suspended" in again.text
