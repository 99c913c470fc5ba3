"""Email verification with a real SMTP server (aiosmtpd on localhost): with SMTP configured,
a signup's credits are not there to spend until the mailed link is followed, and following
it grants them once. The app `create_app` builds, on real SQLite / PostgreSQL and Redis."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from email import message_from_bytes
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Message
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from kernel import redis_keys as rk
from serve_app.http_app import create_app
from serve_app.services import Services
from tests.billing import conftest as billing

db_url = billing.db_url
engine = billing.engine
r = billing.r
USD = billing.USD


class Inbox(Message):
    def __init__(self) -> None:
        super().__init__()
        self.mail: list[Any] = []

    def handle_message(self, message: Any) -> None:
        self.mail.append(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def inbox() -> Iterator[tuple[Inbox, int]]:
    handler = Inbox()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, port
    controller.stop()


def test_signup_credits_wait_for_the_mailed_link(
    db_url: str, engine: Engine, r: redis.Redis, inbox: tuple[Inbox, int]
) -> None:
    handler, port = inbox
    services = Services.create(
        {
            "database_url": db_url,
            "redis_url": billing.REDIS_URL,
            "smtp_host": "127.0.0.1",
            "smtp_port": port,
            "smtp_starttls": False,
            "public_url": "https://api.darkgpu.test",
        }
    )
    try:
        with TestClient(create_app(services)) as c:
            made = c.post(
                "/v1/auth/signup", json={"email": "new@example.com", "password": "long password!"}
            )
            assert made.status_code == 201, made.text
            body = made.json()
            assert body["email_verification"] == "sent" and body["credits_nusd"] == 0
            assert int(r.get(rk.balance(body["id"])) or 0) == 0  # nothing to spend yet

            [mail] = handler.mail
            parsed = message_from_bytes(mail.as_bytes())
            assert parsed["To"] == "new@example.com"
            text = parsed.get_payload(decode=True).decode()
            link = re.search(r"(https://api\.darkgpu\.test/v1/auth/verify\?token=\S+)", text)[1]
            token = urlsplit(link).query.split("=", 1)[1]
            [stored] = r.keys("dg:verify:*")  # only the token's hash, and it expires
            assert token.encode() not in stored and r.get(stored) == str(body["id"]).encode()
            assert 0 < r.ttl(stored) <= 48 * 3600

            followed = c.get(link.replace("https://api.darkgpu.test", ""))
            assert followed.status_code == 200, followed.text
            assert followed.json()["credits_granted_nusd"] == 10 * USD
            assert int(r.get(rk.balance(body["id"])) or 0) == 10 * USD
            again = c.get(link.replace("https://api.darkgpu.test", ""))
            assert again.status_code == 400
            assert again.json()["error"]["code"] == "invalid_verification_link"
            assert int(r.get(rk.balance(body["id"])) or 0) == 10 * USD  # granted once
            forged = c.get("/v1/auth/verify?token=made-up")
            assert forged.status_code == 400
    finally:
        services.db.dispose()


def test_without_smtp_signup_grants_at_once(db_url: str, engine: Engine, r: redis.Redis) -> None:
    services = Services.create({"database_url": db_url, "redis_url": billing.REDIS_URL})
    try:
        with TestClient(create_app(services)) as c:
            made = c.post(
                "/v1/auth/signup", json={"email": "local@example.com", "password": "long password!"}
            )
            assert made.status_code == 201
            assert made.json()["email_verification"] is None
            assert made.json()["credits_nusd"] == 10 * USD
    finally:
        services.db.dispose()
