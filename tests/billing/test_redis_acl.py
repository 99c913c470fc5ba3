"""The ACL users of the local platform's Redis servers: who can do what, tried as each role
against real servers (`billing.redis_server.ACL_RULES`, `core.redis_users`)."""

from __future__ import annotations

import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from billing.redis_server import (
    LocalRedis,
    RedisServerError,
    check_money_redis,
    money_server,
    state_server,
)
from core import redis_users
from core.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    money, state = free_port(), free_port()
    redis_users.ensure(tmp_path, {"money": money, "state": state})
    return Settings(
        data_dir=tmp_path,
        redis_url=f"redis://127.0.0.1:{money}/0",
        state_redis_url=f"redis://127.0.0.1:{state}/0",
    )


@pytest.fixture
def servers(settings: Settings) -> Iterator[tuple[LocalRedis, LocalRedis]]:
    money, state = money_server(settings), state_server(settings)
    assert money is not None and state is not None
    money.start()
    state.start()
    yield money, state
    money.stop()
    state.stop()


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5)


def test_settings_authenticate_each_role_on_local_servers_only(tmp_path: Path) -> None:
    plain = Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:7001/0")
    assert plain.redis_url == "redis://127.0.0.1:7001/0"  # no users made here: unchanged
    passwords = redis_users.ensure(tmp_path, {"money": 7001, "state": 7002})
    assert stat.S_IMODE(redis_users.users_path(tmp_path).stat().st_mode) == 0o600
    made = Settings(
        data_dir=tmp_path,
        redis_url="redis://127.0.0.1:7001/0",
        state_redis_url="redis://localhost:7002/3",
    )
    assert made.redis_url == f"redis://platform:{passwords['money']['platform']}@127.0.0.1:7001/0"
    assert made.meter_redis_url.startswith("redis://meter:")
    assert made.state_redis_url == (
        f"redis://platform:{passwords['state']['platform']}@localhost:7002/3"
    )
    assert redis_users.ensure(tmp_path, {}) == passwords  # made once
    elsewhere = Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:7009/0")
    assert elsewhere.redis_url == "redis://127.0.0.1:7009/0"  # not a server of ours: unchanged
    chosen = Settings(
        data_dir=tmp_path,
        redis_url="redis://ops:secret@127.0.0.1:7001/0",
        state_redis_url="redis://redis.internal:6379/0",
    )
    assert chosen.redis_url == "redis://ops:secret@127.0.0.1:7001/0"  # the operator's user
    assert chosen.meter_redis_url == chosen.redis_url
    assert chosen.state_redis_url == "redis://redis.internal:6379/0"  # not ours to fill


def test_the_acl_files_hold_hashes_and_turn_the_default_user_off(
    servers: tuple[LocalRedis, LocalRedis], settings: Settings
) -> None:
    passwords = redis_users.load(settings.resolved_data_dir)
    assert passwords is not None
    for server in servers:
        text = server.aclfile.read_text()
        assert "user default off" in text
        assert stat.S_IMODE(server.aclfile.stat().st_mode) == 0o600
        for users in passwords.values():
            for password in users.values():
                assert password not in text
    anonymous = redis.Redis(host="127.0.0.1", port=servers[0].port, socket_timeout=5)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.get("dg:bal:1")
    wrong = Settings(data_dir=settings.resolved_data_dir, redis_url="redis://x").redis_url
    assert wrong == "redis://x"
    with pytest.raises(redis.exceptions.AuthenticationError):
        client(redis_users.with_user(servers[0].url, "platform", "guessed")).ping()


def test_each_server_knows_its_roles_users_and_no_other(
    servers: tuple[LocalRedis, LocalRedis],
) -> None:
    money, state = (client(server.url) for server in servers)
    assert set(money.acl_users()) == {"default", "admin", "platform", "meter"}
    assert set(state.acl_users()) == {"default", "admin", "platform"}


def test_the_ingress_user_serves_but_cannot_consume_or_administer(
    servers: tuple[LocalRedis, LocalRedis], settings: Settings
) -> None:
    meter = client(settings.meter_redis_url)
    meter.xgroup_create("dg:usage", "meter", id="0", mkstream=True)
    ingress = client(settings.redis_url)
    assert ingress.info("memory")["maxmemory_policy"] == "noeviction"
    ingress.set("dg:bal:1", 100)
    assert ingress.eval("return redis.call('INCRBY', KEYS[1], -5)", 1, "dg:bal:1") == 95
    ingress.xadd("dg:usage", {"request_id": "r1"})
    for attempt in (
        lambda: ingress.xreadgroup("meter", "x", {"dg:usage": ">"}),
        lambda: ingress.xack("dg:usage", "meter", "0-1"),
        lambda: ingress.xdel("dg:usage", "0-1"),
        lambda: ingress.config_set("maxmemory-policy", "allkeys-lru"),
        lambda: ingress.flushall(),
        lambda: ingress.keys("*"),
        lambda: ingress.acl_list(),
        lambda: ingress.set("other:key", 1),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    with pytest.raises(redis.exceptions.ResponseError, match="can't run this command"):
        ingress.eval("return redis.call('FLUSHALL')", 0)  # nor from inside a script
    got = meter.xreadgroup("meter", "m1", {"dg:usage": ">"})
    assert got and got[0][1][0][1] == {b"request_id": b"r1"}
    assert client(settings.redis_url).get("dg:bal:1") == b"95"


def test_up_and_down_manage_servers_with_users(settings: Settings) -> None:
    money = money_server(settings)
    assert money is not None
    money.start()
    try:
        assert money.is_running()
        bare = LocalRedis(money.data_dir, money.port)  # no credentials: still sees it answer
        assert bare.is_running()
        bare.start()  # idempotent: a second server is not started on the port
    finally:
        money.stop()
    assert not money.is_running() and money.pid() is None


def test_a_state_url_on_the_money_server_uses_its_users(tmp_path: Path) -> None:
    port = free_port()
    redis_users.ensure(tmp_path, {"money": port})
    settings = Settings(
        data_dir=tmp_path,
        redis_url=f"redis://127.0.0.1:{port}/0",
        state_redis_url=f"redis://localhost:{port}/1",
    )
    assert state_server(settings) is None
    money = money_server(settings)
    assert money is not None
    money.start()
    try:
        state = client(settings.state_redis_url)
        assert state.acl_whoami() == "platform"
        state.set("dg:sess:x", 1)
        assert client(settings.redis_url).get("dg:sess:x") is None  # db 1, not the money keys
    finally:
        money.stop()


def test_wrong_credentials_stop_the_start_with_words_not_the_password(
    servers: tuple[LocalRedis, LocalRedis],
) -> None:
    url = redis_users.with_user(servers[0].url, "platform", "not-the-password")
    with pytest.raises(RedisServerError) as refused:
        check_money_redis(url)
    assert "refused the credentials" in str(refused.value)
    assert "not-the-password" not in str(refused.value)
