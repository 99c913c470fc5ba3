"""The money Redis and the state Redis, in process: the app `create_app` builds on real SQLite
and two real Redis servers started for the test the way `darkgpu up` starts them
(`billing.redis_server.money_server` / `state_server`), the state one bounded to a few MB.

Visitors make nothing grow; what signing in stores goes to the state Redis, every key with
a TTL; at its maxmemory the state Redis evicts sessions and throttle counters while the
money Redis keeps every key; a money Redis that may evict is refused."""

from __future__ import annotations

import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from billing import accounts
from billing.redis_server import (
    EvictingMoneyRedis,
    LocalRedis,
    money_server,
    state_server,
)
from core.db import migrate
from core.settings import Settings
from kernel import redis_keys as rk
from kernel.money import NANO_PER_USD
from serve_app.console.sessions import COOKIE, CSRF_COOKIE, SessionStore, digest
from serve_app.http_app import create_app
from serve_app.services import Services
from serve_app.throttle import Throttle

STATE_MB = 3
HOST = "https://127.0.0.1:8000"
PASSWORD = "correct horse battery staple"
# What only the state Redis may hold: a visitor or a browser can make these grow.
STATE_PREFIXES = (b"dg:console:", b"dg:throttle:", b"dg:supply:")
# ... but the console's one secret, which signs its sessions: where replicas never reach.
SECRET = b"dg:console:secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    made = Settings(
        data_dir=tmp_path,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        state_redis_url=f"redis://127.0.0.1:{free_port()}/0",
        state_redis_maxmemory_mb=STATE_MB,
    )
    servers = [money_server(made), state_server(made)]
    for server in servers:
        assert server is not None
        server.start()
    yield made
    for server in servers:
        server.stop()


@pytest.fixture
def svc(settings: Settings) -> Iterator[Services]:
    services = Services.create(settings.as_args())
    migrate(services.db)
    yield services
    services.db.dispose()


def keys(r: redis.Redis) -> set[bytes]:
    return set(r.scan_iter(count=1000))


def snapshot(r: redis.Redis) -> dict[bytes, bytes]:
    """Every key of a Redis, with its value as DUMP serializes it."""
    return {key: r.dump(key) for key in r.scan_iter(count=1000)}


def browser(app: FastAPI, ip: str = "198.51.100.7") -> TestClient:
    return TestClient(app, base_url=HOST, follow_redirects=False, client=(ip, 50000))


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html)[1]


def test_visitors_grow_no_redis_and_signing_in_writes_only_the_state_redis(
    svc: Services,
) -> None:
    app = create_app(svc)
    browser(app).get("/console/login")  # the one secret, made by the first view
    money, state = keys(svc.redis), keys(svc.state)
    assert state == set() and money == {SECRET}
    for n in range(40):  # cookieless views, and cookies nobody was given
        c = browser(app, ip=f"198.51.{n}.9")
        assert c.get("/console/login").status_code == 200
        assert c.get("/console/signup").status_code == 200
        assert c.get("/console").status_code in (200, 303, 307)
        c.cookies.set(COOKIE, secrets.token_urlsafe(32), path="/console")
        assert c.get("/console/overview").status_code == 303
        no_key = c.get("/v1/providers")
        bad_key = c.get("/v1/providers", headers={"authorization": f"Bearer dgpu-{n:040d}"})
        assert (no_key.status_code, bad_key.status_code) == (401, 401)
    for n in range(40):  # anonymous form posts that guess no password: nothing to count
        c = browser(app, ip=f"203.0.{n}.1")
        csrf = csrf_of(c.get("/console/login").text)
        form = {"email": f"nobody{n}@example.com", "password": "", "csrf_token": csrf}
        assert c.post("/console/login", data=form).status_code == 400  # refused, in words
    assert keys(svc.redis) == money and keys(svc.state) == state

    c = browser(app)
    form = {"email": "in@example.com", "password": PASSWORD,
            "csrf_token": csrf_of(c.get("/console/signup").text)}  # fmt: skip
    assert c.post("/console/signup", data=form).status_code == 200
    c.cookies.delete(CSRF_COOKIE, path="/console")
    assert c.get("/console/overview").status_code == 200  # signed in, from the state Redis
    added_money = keys(svc.redis) - money
    assert added_money and not any(k.startswith(STATE_PREFIXES) for k in added_money)
    assert 0 < svc.redis.ttl(SECRET) <= 30 * 24 * 3600
    added_state = keys(svc.state) - state
    assert any(k.startswith(b"dg:console:session:") for k in added_state)
    assert any(k.startswith(b"dg:throttle:signup:") for k in added_state)
    for key in keys(svc.state):
        assert svc.state.ttl(key) > 0, key  # nothing there lives forever


def test_a_full_state_redis_evicts_sessions_and_throttles_the_money_redis_keeps_every_key(
    svc: Services,
) -> None:
    made = []
    for n in range(5):
        account = accounts.create_account(svc.db, svc.redis, svc.plans,
                                          email=f"rich{n}@example.com", plan="free")  # fmt: skip
        accounts.grant_credits(svc.db, svc.redis, account_id=account.id,
                               amount_nusd=(n + 1) * NANO_PER_USD)  # fmt: skip
        accounts.create_key(svc.db, svc.redis, account_id=account.id, name="k")
        made.append(account)
    sessions = SessionStore(svc.state, accounts=svc.redis)
    throttle = Throttle(svc.state, svc.settings)
    first, _ = sessions.start(made[0].id, made[0].email)  # and the console's secret
    money = snapshot(svc.redis)
    assert any(k.startswith(b"dg:bal:") for k in money) and SECRET in money

    n = 0
    while svc.state.info("stats")["evicted_keys"] < 1000:  # well past full
        account = made[n % len(made)]
        sessions.start(account.id, account.email)
        throttle.check(throttle.signin, f"10.{n >> 8 & 255}.{n & 255}.1")  # a network each
        n += 1
        assert n < 100_000, "the state Redis never evicted"
    assert svc.state.info("memory")["used_memory"] <= STATE_MB * 1024 * 1024
    # sessions and counters were evicted (approximated LRU: which ones is Redis's choice)
    stored = len(list(svc.state.scan_iter("dg:console:session:*", count=1000)))
    counted = len(list(svc.state.scan_iter("dg:throttle:signin:*", count=1000)))
    assert 0 < stored < n + 1 and 0 < counted < 2 * n
    still = sessions.find(first)
    assert still is None or still.account_id == made[0].id  # evicted: signed out, no more

    assert snapshot(svc.redis) == money  # every money key, byte for byte
    assert svc.redis.info("stats")["evicted_keys"] == 0
    assert svc.redis.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


def test_a_session_written_without_the_secret_is_refused(svc: Services) -> None:
    """The state Redis is held to less than the money one (bounded, evicting): a session hash
    made there by hand signs nobody in."""
    victim = accounts.create_account(svc.db, svc.redis, svc.plans, email="v@example.com",
                                     plan="free")  # fmt: skip
    sessions = SessionStore(svc.state, accounts=svc.redis)
    token, real = sessions.start(victim.id, victim.email)
    assert sessions.find(token) == real
    forged_token = secrets.token_urlsafe(32)
    stored = svc.state.hgetall(rk.console_session(real.token_hash))
    svc.state.hset(rk.console_session(digest(forged_token)), mapping=stored)  # a copy
    assert sessions.find(forged_token) is None
    fields = {"csrf": "c", "account_id": str(victim.id), "email": victim.email}
    svc.state.hset(rk.console_session(digest(forged_token)), mapping=fields)  # no MAC
    assert sessions.find(forged_token) is None
    assert svc.state.get("dg:console:secret") is None  # the key is not in the state Redis
    assert sessions.find(token) == real


def test_a_session_of_a_suspended_account_is_refused(svc: Services) -> None:
    """Suspension ends an account's sessions; a session the suspension did not reach (kept
    in the state Redis, while the operator's command spoke to the money Redis) is refused
    all the same, from the account's status in the money Redis."""
    account = accounts.create_account(svc.db, svc.redis, svc.plans, email="s@example.com",
                                      plan="free")  # fmt: skip
    sessions = SessionStore(svc.state, accounts=svc.redis)
    token, session = sessions.start(account.id, account.email)
    assert sessions.find(token) == session
    accounts.set_status(svc.db, svc.redis, account_id=account.id, status="suspended")
    assert sessions.find(token) is None
    assert not svc.state.exists(rk.console_session(session.token_hash))  # ended, too
    accounts.set_status(svc.db, svc.redis, account_id=account.id, status="active")
    assert sessions.find(token) is None  # signing in again starts a new one


def test_an_ingress_does_not_start_on_a_money_redis_that_may_evict(
    settings: Settings, tmp_path: Path
) -> None:
    lru = LocalRedis(tmp_path / "lru", free_port(), persistent=False, policy="allkeys-lfu")
    lru.start()
    try:
        with pytest.raises(EvictingMoneyRedis, match="maxmemory-policy 'allkeys-lfu'"):
            Services.create({**settings.as_args(), "redis_url": lru.url})
    finally:
        lru.stop()
