"""Sign-up throttles on `POST /v1/auth/signup`: per client IP and per network, 429 before any
password is hashed, counters that expire, and `X-Forwarded-For` believed only from a
configured proxy. The app `create_app` builds, on real SQLite / PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from argon2 import PasswordHasher
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from starlette.requests import Request

from billing import accounts, signup
from serve_app.http_app import create_app
from serve_app.services import Services
from serve_app.throttle import client_ip, network_of, parse_networks
from tests.billing import conftest as billing

db_url = billing.db_url
engine = billing.engine
r = billing.r
PASSWORD = "a long enough password"


@pytest.fixture
def make_app(db_url: str, engine: Engine, r: redis.Redis) -> Iterator[Any]:
    made: list[Services] = []

    def make(**settings: Any) -> tuple[FastAPI, Services]:
        services = Services.create(
            {"database_url": db_url, "redis_url": billing.REDIS_URL, **settings}
        )
        made.append(services)
        return create_app(services), services

    yield make
    for services in made:
        services.db.dispose()


class CountingHasher(PasswordHasher):
    """argon2-cffi's own hasher (argon2id, its defaults), keeping a count of its hashes."""

    def __init__(self) -> None:
        super().__init__()
        self.made = 0

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        self.made += 1
        return super().hash(password, salt=salt)


@pytest.fixture
def hasher(monkeypatch: pytest.MonkeyPatch) -> CountingHasher:
    counting = CountingHasher()
    monkeypatch.setattr(signup, "_hasher", counting)
    return counting


def post_signup(app: FastAPI, ip: str, email: str, **headers: str) -> Any:
    with TestClient(app, client=(ip, 40000)) as c:
        return c.post(
            "/v1/auth/signup", json={"email": email, "password": PASSWORD}, headers=headers
        )


def test_signups_are_throttled_per_ip_and_network_before_hashing(
    make_app: Any, engine: Engine, r: redis.Redis, hasher: CountingHasher
) -> None:
    app, _ = make_app(signup_limit_per_ip=2, signup_limit_per_network=3)
    for n in range(2):
        assert post_signup(app, "203.0.113.5", f"a{n}@example.com").status_code == 201
    assert hasher.made == 2
    refused = post_signup(app, "203.0.113.5", "a2@example.com")
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["type"] == "rate_limit" and error["code"] == "rate_limit_exceeded"
    assert 0 < int(refused.headers["retry-after"]) <= 3600
    assert "Too many sign-ups" in error["message"]
    assert hasher.made == 2  # refused before argon2
    assert accounts.find_account(engine, "a2@example.com") is None
    # another address of the same /24: its own IP count, the network's third and last
    assert post_signup(app, "203.0.113.77", "b0@example.com").status_code == 201
    assert post_signup(app, "203.0.113.78", "b1@example.com").status_code == 429
    # X-Forwarded-For from a peer that is not a configured proxy changes nothing
    spoofed = post_signup(app, "203.0.113.79", "b2@example.com", **{"x-forwarded-for": "1.2.3.4"})
    assert spoofed.status_code == 429
    # another network is not affected
    assert post_signup(app, "198.51.100.7", "c0@example.com").status_code == 201
    assert hasher.made == 4
    keys = r.keys("dg:throttle:*")
    assert keys and all(0 < r.ttl(k) <= 3600 for k in keys)  # every counter expires


def test_forwarded_for_is_believed_only_from_a_trusted_proxy(make_app: Any) -> None:
    app, _ = make_app(
        signup_limit_per_ip=1, signup_limit_per_network=10, trusted_proxies=["10.0.0.0/8"]
    )
    via = {"x-forwarded-for": "192.0.2.10, 10.0.0.3"}  # client, then an inner proxy
    assert post_signup(app, "10.0.0.2", "p0@example.com", **via).status_code == 201
    # the same proxy, another client behind it: not throttled by the first one's count
    other = {"x-forwarded-for": "192.0.2.11"}
    assert post_signup(app, "10.0.0.2", "p1@example.com", **other).status_code == 201
    assert post_signup(app, "10.0.0.2", "p2@example.com", **via).status_code == 429


def _request(peer: str, forwarded: str | None = None) -> Request:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    return Request({"type": "http", "client": (peer, 1), "headers": headers})


def test_client_ip_and_network() -> None:
    trusted = parse_networks(["10.0.0.0/8", "2001:db8::1"])
    assert client_ip(_request("203.0.113.5", "1.2.3.4")) == "203.0.113.5"
    assert client_ip(_request("10.1.1.1", "1.2.3.4, 10.9.9.9"), trusted) == "1.2.3.4"
    assert client_ip(_request("2001:db8::1", "5.6.7.8"), trusted) == "5.6.7.8"
    assert client_ip(_request("10.1.1.1"), trusted) == "10.1.1.1"  # no header: the proxy
    assert client_ip(_request("10.1.1.1", "junk, 10.2.2.2"), trusted) == "10.2.2.2"
    assert client_ip(_request("::ffff:203.0.113.5")) == "203.0.113.5"
    assert network_of("203.0.113.5") == "203.0.113.0/24"
    assert network_of("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert network_of("testclient") == "testclient"
