"""Changing and resetting a console password, on the app `create_app` builds, real SQLite,
a real Redis and a real SMTP server (aiosmtpd on localhost): the mailed link works once,
within its hour, for its own account only; the reset form tells nobody which addresses are
registered; guessing is throttled; a new password signs out the sessions of the old one."""

from __future__ import annotations

import re
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi import FastAPI
from httpx import Response

from billing import passwords, signup
from core.db import migrate
from serve_app.console.sessions import COOKIE
from serve_app.http_app import create_app
from serve_app.services import Services
from tests.serve_app.test_console_app import PASSWORD, REDIS_URL, client, csrf_of, signed_up
from tests.serve_app.test_email_verification import Inbox, free_port

NEW_PASSWORD = "a much better passphrase"
PUBLIC = "https://console.darkgpu.test"


@pytest.fixture
def inbox() -> Iterator[Inbox]:
    from aiosmtpd.controller import Controller

    handler = Inbox()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    handler.port = port  # type: ignore[attr-defined]
    yield handler
    controller.stop()


def make_services(tmp_path: Path, **settings: Any) -> Services:
    services = Services.create({"data_dir": str(tmp_path), "redis_url": REDIS_URL, **settings})
    services.redis.flushdb()
    migrate(services.db)
    return services


@pytest.fixture
def svc(tmp_path: Path, inbox: Inbox) -> Iterator[Services]:
    services = make_services(
        tmp_path, smtp_host="127.0.0.1", smtp_port=inbox.port, smtp_starttls=False,  # type: ignore[attr-defined]
        public_url=PUBLIC,
    )  # fmt: skip
    yield services
    services.redis.flushdb()
    services.db.dispose()


@pytest.fixture
def app(svc: Services) -> FastAPI:
    return create_app(svc)


def ask_reset(app: FastAPI, email: str, ip: str = "testclient") -> Response:
    c = client(app, ip=ip)
    csrf = csrf_of(c.get("/console/reset").text)
    return c.post("/console/reset", data={"email": email, "csrf_token": csrf})


def links_in(inbox: Inbox, to: str) -> list[str]:
    found = []
    for mail in inbox.mail:
        parsed = message_from_bytes(mail.as_bytes())
        if parsed["To"] == to and parsed["Subject"] == "Reset your DarkGPU password":
            text = parsed.get_payload(decode=True).decode()
            found.append(re.search(r"(https://\S+/console/reset/confirm\?token=\S+)", text)[1])
    return found


def confirm(app: FastAPI, link: str, new: str = NEW_PASSWORD, ip: str = "testclient",
            **extra: str) -> Response:  # fmt: skip
    c = client(app, ip=ip)
    path = link.removeprefix(PUBLIC)
    form = c.get(path)
    assert form.status_code == 200, form.text
    token = re.search(r'name="token" value="([^"]*)"', form.text)[1]
    fields = {"token": token, "new_password": new, "csrf_token": csrf_of(form.text), **extra}
    return c.post("/console/reset/confirm", data=fields)


def sign_in(app: FastAPI, email: str, password: str) -> Response:
    c = client(app)
    csrf = csrf_of(c.get("/console/login").text)
    return c.post("/console/login", data={"email": email, "password": password, "csrf_token": csrf})


def without_tokens(html: str) -> str:
    return re.sub(r'name="csrf_token" value="[^"]+"', "", html)


def test_reset_by_mailed_link_works_once_and_signs_everyone_out(
    app: FastAPI, svc: Services, inbox: Inbox
) -> None:
    owner, _ = signed_up(app, "owner@example.com")
    assert owner.get("/console/overview").status_code == 200
    known = ask_reset(app, "Owner@Example.com")
    unknown = ask_reset(app, "nobody@example.com")
    # the same answer for an address with an account and one without
    assert known.status_code == unknown.status_code == 200
    assert without_tokens(known.text).replace("Owner@Example.com", "X") == without_tokens(
        unknown.text
    ).replace("nobody@example.com", "X")
    assert "If an account uses that address" in known.text
    assert links_in(inbox, "nobody@example.com") == []
    [link] = links_in(inbox, "owner@example.com")
    assert link.startswith(PUBLIC + "/console/reset/confirm?token=")
    token = urlsplit(link).query.split("=", 1)[1]
    stored = svc.redis.keys("dg:pwreset:*")
    assert stored and all(token.encode() not in k and svc.redis.get(k) != token.encode()
                          for k in stored)  # fmt: skip
    assert all(0 < svc.redis.ttl(k) <= 3600 for k in stored)  # an hour at most

    # opening the link uses nothing; a password too short keeps the token
    short = confirm(app, link, new="short")
    assert short.status_code == 400 and "at least 10 characters" in short.text
    done = confirm(app, link)
    assert done.status_code == 303 and done.headers["location"] == "/console/login?reset=1"
    assert owner.get("/console/overview").status_code == 303  # the old session is gone
    assert sign_in(app, "owner@example.com", PASSWORD).status_code == 400
    assert sign_in(app, "owner@example.com", NEW_PASSWORD).status_code == 303

    again = confirm(app, link, new="yet another passphrase")  # the link is used up
    assert again.status_code == 400 and "not valid" in again.text
    assert sign_in(app, "owner@example.com", NEW_PASSWORD).status_code == 303
    left = [k for k in svc.redis.keys("dg:pwreset:*") if not k.startswith(b"dg:pwreset:mails:")]
    assert left == []  # the token and the account's pointer to it are gone


def test_a_newer_link_voids_the_older_and_links_expire(
    app: FastAPI, svc: Services, inbox: Inbox
) -> None:
    signed_up(app, "twice@example.com")
    ask_reset(app, "twice@example.com")
    ask_reset(app, "twice@example.com")
    first, second = links_in(inbox, "twice@example.com")
    assert confirm(app, first).status_code == 400  # replaced by the second
    # the second, once its hour is over (Redis expires it: made due now)
    hashed = passwords._digest(urlsplit(second).query.split("=", 1)[1])
    assert svc.redis.ttl(f"dg:pwreset:{hashed}") > 0
    svc.redis.pexpire(f"dg:pwreset:{hashed}", 1)
    while svc.redis.exists(f"dg:pwreset:{hashed}"):
        pass
    expired = confirm(app, second)
    assert expired.status_code == 400 and "expired" in expired.text
    assert sign_in(app, "twice@example.com", PASSWORD).status_code == 303


def test_a_token_resets_only_its_own_account(app: FastAPI, svc: Services, inbox: Inbox) -> None:
    signed_up(app, "mallory@example.com")
    signed_up(app, "victim@example.com")
    ask_reset(app, "mallory@example.com")
    [link] = links_in(inbox, "mallory@example.com")
    victim = signup.verify_password(svc.db, "victim@example.com", PASSWORD)
    # Mallory's own token, with every field that might name another account
    done = confirm(app, link, email="victim@example.com", account_id=str(victim))
    assert done.status_code == 303
    assert sign_in(app, "victim@example.com", PASSWORD).status_code == 303  # untouched
    assert sign_in(app, "victim@example.com", NEW_PASSWORD).status_code == 400
    assert sign_in(app, "mallory@example.com", NEW_PASSWORD).status_code == 303


def test_guessing_tokens_is_throttled_and_mail_to_one_address_capped(
    tmp_path: Path, inbox: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = make_services(tmp_path, smtp_host="127.0.0.1", smtp_port=inbox.port,  # type: ignore[attr-defined]
                        smtp_starttls=False, public_url=PUBLIC)  # fmt: skip
    monkeypatch.setattr(svc.settings, "signin_limit_per_ip", 3)
    try:
        app = create_app(svc)
        signed_up(app, "target@example.com")
        ask_reset(app, "target@example.com", ip="198.51.100.9")
        [link] = links_in(inbox, "target@example.com")
        for guess in ("a" * 43, "b" * 43, "c" * 43):  # the limit: 3 a window
            wrong = confirm(app, f"{PUBLIC}/console/reset/confirm?token={guess}", ip="203.0.113.5")
            assert wrong.status_code == 400
        throttled = confirm(app, link, ip="203.0.113.5")  # the right token, past the limit
        assert throttled.status_code == 429 and "Too many" in throttled.text
        assert int(throttled.headers["retry-after"]) > 0
        assert confirm(app, link, ip="192.0.2.44").status_code == 303  # not spent by the 429

        for n in range(passwords.MAILS_PER_ADDRESS + 2):  # one inbox, many requests
            answer = ask_reset(app, "target@example.com", ip=f"192.0.{n + 10}.1")
            assert answer.status_code == 200 and "If an account uses" in answer.text
        assert len(links_in(inbox, "target@example.com")) == passwords.MAILS_PER_ADDRESS
    finally:
        svc.redis.flushdb()
        svc.db.dispose()


def test_changing_the_password_needs_the_current_one_and_ends_other_sessions(
    app: FastAPI, svc: Services, inbox: Inbox
) -> None:
    here, csrf = signed_up(app, "change@example.com")
    elsewhere = client(app)
    assert sign_in(app, "change@example.com", PASSWORD).status_code == 303
    elsewhere.cookies.set(COOKIE, sign_in(app, "change@example.com", PASSWORD).cookies[COOKIE])
    assert elsewhere.get("/console/overview").status_code == 200
    other, _ = signed_up(app, "bystander@example.com")

    def change(current: str, new: str) -> Response:
        return here.post("/console/account/password", data={
            "current_password": current, "new_password": new, "csrf_token": csrf})  # fmt: skip

    wrong = change("not my password", NEW_PASSWORD)
    assert wrong.status_code == 400 and "current password is not right" in wrong.text
    short = change(PASSWORD, "short")
    assert short.status_code == 400 and "at least 10" in short.text
    assert elsewhere.get("/console/overview").status_code == 200  # nothing changed yet
    ok = change(PASSWORD, NEW_PASSWORD)
    assert ok.status_code == 303 and ok.headers["location"] == "/console/account?done=changed"
    assert "password is changed" in here.get(ok.headers["location"]).text  # this one stays
    assert elsewhere.get("/console/overview").status_code == 303  # the other is signed out
    assert other.get("/console/overview").status_code == 200  # another account's stays
    assert sign_in(app, "change@example.com", PASSWORD).status_code == 400
    assert sign_in(app, "change@example.com", NEW_PASSWORD).status_code == 303
    fields = {"current_password": NEW_PASSWORD, "new_password": "x" * 12, "csrf_token": csrf}
    forged = client(app).post("/console/account/password", data=fields)
    assert forged.status_code in (303, 403)  # no session: nothing changes
    assert sign_in(app, "change@example.com", NEW_PASSWORD).status_code == 303


def test_without_smtp_the_reset_page_says_so(tmp_path: Path) -> None:
    svc = make_services(tmp_path)
    try:
        app = create_app(svc)
        signed_up(app, "local@example.com")
        page = client(app).get("/console/reset")
        assert "not set up on this platform" in page.text
        answer = ask_reset(app, "local@example.com")
        assert "not set up on this platform" in answer.text and svc.redis.keys("dg:pwreset:*") == []
    finally:
        svc.redis.flushdb()
        svc.db.dispose()
