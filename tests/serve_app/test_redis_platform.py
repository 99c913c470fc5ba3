"""The two Redis servers of the real platform (`darkgpu up`, the `platform` fixture): the money
Redis never evicts and, full, refuses requests with 503 in the OpenAI shape, losing nothing;
the state Redis is bounded and evicting; model replicas, which run on providers' nodes, talk
to neither; a flood of cookieless views and junk keys grows neither."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
import redis

from kernel import redis_keys as rk
from kernel.tokens import hash_key
from tests.platform_redis import admin_client

LOCAL = "darkgpu-tiny"
# Ray's title of a model replica's process: each model is an application `model-<id>`
REPLICA_TITLE = "ServeReplica:model-"
STATE_PREFIXES = (b"dg:console:", b"dg:throttle:", b"dg:supply:")


@pytest.fixture(scope="module")
def money(platform) -> Iterator[redis.Redis]:
    client = admin_client(platform.env, "money")
    yield client
    client.close()


@pytest.fixture(scope="module")
def state(platform) -> Iterator[redis.Redis]:
    client = admin_client(platform.env, "state")
    yield client
    client.close()


def clients_of(url: str) -> list[str]:
    """The command lines of the processes holding a connection to the Redis at `url`."""
    port = urlsplit(url).port
    found = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.raddr and conn.raddr.port == port and conn.pid:
            try:
                found.append(" ".join(psutil.Process(conn.pid).cmdline()))
            except psutil.Error:
                continue
    return found


def chat(platform, key: str, **extra) -> httpx.Response:
    return httpx.post(
        f"{platform.api_url}/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": LOCAL, "messages": [{"role": "user", "content": "hi"}],
              "max_tokens": 4, **extra},
        timeout=120,
    )  # fmt: skip


def test_up_runs_a_money_and_a_bounded_state_redis(money, state) -> None:
    config = money.config_get("*")
    assert config["maxmemory-policy"] == "noeviction" and config["appendonly"] == "yes"
    config = state.config_get("*")
    assert config["maxmemory-policy"] == "allkeys-lru"
    assert config["maxmemory"] == str(256 * 1024 * 1024)  # Settings.state_redis_maxmemory_mb
    assert config["appendonly"] == "no" and config["save"] == ""
    assert money.info("server")["tcp_port"] != state.info("server")["tcp_port"]


def test_model_replicas_reach_neither_redis(platform, money, state) -> None:
    _, key = platform.new_key("paid", usd="5")
    served = chat(platform, key)  # by a model replica, which is up then
    assert served.status_code == 200, served.text
    replicas = [p for p in psutil.process_iter(["cmdline"])
                if REPLICA_TITLE in " ".join(p.info["cmdline"] or [])]  # fmt: skip
    assert replicas, "no model replica process found"
    for url in (platform.env["DARKGPU_REDIS_URL"], platform.env["DARKGPU_STATE_REDIS_URL"]):
        assert [c for c in clients_of(url) if REPLICA_TITLE in c] == []
    # and neither server has a user for them: only the platform's own roles
    assert set(money.acl_users()) == {"default", "admin", "platform", "meter"}
    assert set(state.acl_users()) == {"default", "admin", "platform"}
    # the billing actor counts the providers serving all the same
    deadline = time.monotonic() + 120
    while serving(platform, "basic") < 1:
        assert time.monotonic() < deadline, "no provider counted as serving"
        time.sleep(1)


def serving(platform, tier: str) -> float:
    """`ray_darkgpu_providers_serving` of `tier` as the metrics endpoint shows it now."""
    text = httpx.get(platform.metrics_url, timeout=30).text
    found = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ray_darkgpu_providers_serving{") and f'tier="{tier}"' in line
    ]
    return max(found, default=0.0)  # fmt: skip


def test_a_cookieless_flood_grows_neither_redis(platform, money, state) -> None:
    base = platform.api_url.removesuffix("/v1")
    with httpx.Client(timeout=60) as warm:
        assert warm.get(f"{base}/console/login").status_code == 200  # the CSRF secret, once
    before = (set(money.scan_iter(count=1000)), set(state.scan_iter(count=1000)))
    junk = {"authorization": "Bearer dgpu-" + "0" * 40}
    for n in range(60):
        with httpx.Client(timeout=60) as c:  # a new visitor each time: no cookies
            assert c.get(f"{base}/console/login").status_code == 200
            assert c.get(f"{base}/console/signup").status_code == 200
            overview = c.get(f"{base}/console/overview", headers={"cookie": f"dgpu_session=x{n}"})
            assert overview.status_code == 303
            assert c.get(f"{platform.api_url}/models").status_code == 401
            assert c.get(f"{platform.api_url}/models", headers=junk).status_code == 401
            refused = c.post(f"{platform.api_url}/chat/completions", headers=junk,
                             json={"model": LOCAL, "messages": []})  # fmt: skip
            assert refused.status_code == 401
    new_money = set(money.scan_iter(count=1000)) - before[0]
    new_state = set(state.scan_iter(count=1000)) - before[1]
    assert (new_money, new_state) == (set(), set())  # keys of earlier tests may expire meanwhile


def test_a_full_money_redis_refuses_with_503_and_keeps_every_key(platform, money) -> None:
    account, key = platform.new_key("paid", usd="5")
    assert chat(platform, key).status_code == 200
    deadline = time.monotonic() + 60
    while money.scard(rk.account_holds(account)):  # settled
        assert time.monotonic() < deadline
        time.sleep(0.2)
    kept = {k: money.dump(k) for k in (rk.balance(account), rk.account(account),
                                       rk.api_key(hash_key(key)))}  # fmt: skip
    evicted = money.info("stats")["evicted_keys"]
    money.config_set("maxmemory", 1)  # far below what it holds: every write is refused
    try:
        for shape in ({}, {"stream": True}, {"stream": True, "stream_options":
                                            {"include_usage": True}}):  # fmt: skip
            refused = chat(platform, key, **shape)
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["type"] == "service_unavailable" and error["message"], error
            assert int(refused.headers["retry-after"]) > 0
        assert {k: money.dump(k) for k in kept} == kept  # nothing reserved, nothing evicted
    finally:
        money.config_set("maxmemory", 0)
    assert money.info("stats")["evicted_keys"] == evicted
    served = chat(platform, key)  # room again: served as before
    assert served.status_code == 200, served.text


def test_the_money_redis_holds_no_visitor_state_and_every_state_key_expires(money, state) -> None:
    found = [k for k in money.scan_iter(count=1000) if k.startswith(STATE_PREFIXES)]
    assert found in ([], [b"dg:console:secret"])  # the one key that signs the console's
    for k in state.scan_iter(count=1000):
        assert state.pttl(k) != -1, k  # -2: expired since the scan
