"""An ingress replica killed mid-stream: its request is billed its last checkpoint, not zero.

The platform here is this file's own (`darkgpu up` on ports of its own), with a hold TTL of
a few seconds, a reaper that sweeps every second and a checkpoint every 4 tokens, so that a
hold its ingress stopped extending is reaped within the test; killing the ingress leaves the
session's shared `platform` alone. A stream of 200 tokens is read through the OpenAI SDK;
once its hold holds a checkpoint of a few tokens, the ingress's Serve replica (its process,
`ray::ServeReplica:darkgpu:ingress`, found among this cluster's raylet's children) is
SIGKILLed. Serve starts another; the stream is cut; the reaper settles the orphaned hold at
its last checkpoint, which the meter writes to the ledger: the account pays that much at the
provider's price, no more than it was sent, and the provider earns its share.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import earnings
from cluster.processes import cmdline, descendants, session_of, session_processes
from core.db import make_engine
from core.schema import UsageEvent
from core.settings import Settings
from kernel import redis_keys as rk
from kernel.money import split_cost
from tests.conftest import Platform
from tests.exact_tokens import EXACT
from tests.platform_redis import admin_client
from tests.ports import port

MODEL = "darkgpu-tiny"
MSG = [{"role": "user", "content": "Tell me a story about a small robot."}]
PORTS = {"RAY_PORT": port(6420), "HTTP_PORT": port(8040), "METRICS_PORT": port(8120),
         "DASHBOARD_PORT": port(8305), "POOL_RAY_PORT": port(6424), "POOL_HTTP_PORT": port(8041),
         "POOL_METRICS_PORT": port(8121), "POOL_DASHBOARD_PORT": port(8306)}  # fmt: skip
REDIS_PORT, STATE_REDIS_PORT = port(6422), port(6423)
HOLD_TTL_S = 8
CHECKPOINT_TOKENS = 4
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def crashable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    data = tmp_path_factory.mktemp("crash")
    env = {**os.environ, "DARKGPU_DATA_DIR": str(data),
           "DARKGPU_REDIS_URL": f"redis://127.0.0.1:{REDIS_PORT}/0",
           "DARKGPU_STATE_REDIS_URL": f"redis://127.0.0.1:{STATE_REDIS_PORT}/0",
           "DARKGPU_HOLD_TTL_S": str(HOLD_TTL_S), "DARKGPU_REAP_EVERY_S": "1",
           "DARKGPU_CHECKPOINT_TOKENS": str(CHECKPOINT_TOKENS),
           **{f"DARKGPU_{k}": str(v) for k, v in PORTS.items()},
           "DARKGPU_POOL_TIERS": '["basic"]'}  # fmt: skip  # it serves from the basic pool's head
    for name in ("DARKGPU_DATABASE_URL", "RAY_ADDRESS", "DARKGPU_STRIPE_SECRET_KEY",
                 "DARKGPU_STRIPE_WEBHOOK_SECRET", "DARKGPU_STRIPE_API_BASE"):  # fmt: skip
        env.pop(name, None)
    api = f"http://127.0.0.1:{PORTS['HTTP_PORT']}/v1"
    platform = Platform(env=env, api_url=api, metrics_url="", stripe=None)  # type: ignore[arg-type]
    started = platform.darkgpu("up")
    try:
        assert started.returncode == 0, f"{started.stdout}\n{started.stderr[-4000:]}"
        yield platform
    finally:
        platform.darkgpu("down", timeout=300)


def ingress_process() -> psutil.Process:
    """This cluster's ingress replica: a child of its raylet titled after the deployment."""
    session = session_of(PORTS["RAY_PORT"])
    assert session, "the cluster is not running"
    raylets = [p for p in session_processes(session) if "raylet" in p.name()]
    found = [child for raylet in raylets for child in descendants(raylet.pid)
             if "ServeReplica:darkgpu:ingress" in cmdline(child)]  # fmt: skip
    assert len(found) == 1, [cmdline(p) for p in found]
    return found[0]


def get(platform: Platform, key: str, path: str) -> httpx.Response:
    return httpx.get(f"{platform.api_url}{path}", headers={"authorization": f"Bearer {key}"},
                     timeout=30)  # fmt: skip


def wait_for(check, timeout_s: float, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except httpx.HTTPError:  # the ingress is not back yet
            result = None
        if result or time.monotonic() > deadline:
            return result
        time.sleep(every_s)


def usage_of(line: str) -> dict | None:
    """The usage an SSE line reports (every chunk does: `continuous_usage_stats`)."""
    if not line.startswith("data: {"):
        return None
    return json.loads(line.removeprefix("data: ")).get("usage")


def kill_at_checkpoint(money: redis.Redis, request_id: str, ingress: psutil.Process) -> int:
    """SIGKILL the ingress once its stream's hold holds a checkpoint of a few tokens (the
    ingress runs ahead of the client, and under load its checkpoints behind the stream): the
    checkpoint it saw, or -1 if the hold was settled first."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        seen = money.hget(rk.hold(request_id), "cp_completion")
        if not money.exists(rk.hold(request_id)):
            return -1
        if seen is not None and int(seen) >= CHECKPOINT_TOKENS:
            ingress.send_signal(signal.SIGKILL)
            return int(seen)
        time.sleep(0.002)
    return -1


def test_a_killed_ingress_bills_the_streams_last_checkpoint(crashable: Platform) -> None:
    platform = crashable
    _, key = platform.new_key("paid", usd="1")
    start = get(platform, key, "/credits").json()["balance_nusd"]
    pricing = get(platform, key, f"/models/{MODEL}").json()["pricing"]
    pin, pout = pricing["input_nusd_per_token"], pricing["output_nusd_per_token"]
    client = openai.OpenAI(base_url=platform.api_url, api_key=key, max_retries=0, timeout=60)
    money = admin_client(platform.env, "money")
    ingress = ingress_process()
    delivered = {"prompt_tokens": 0, "completion_tokens": 0}
    killed: list[int] = []
    ended_by: str | None = None
    opened = client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=MSG,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        extra_body={"ignore_eos": True},
    )
    try:
        with opened as response:
            request_id = response.headers["x-darkgpu-request-id"]
            provider = response.headers["x-darkgpu-provider"]
            killer = threading.Thread(
                target=lambda: killed.append(kill_at_checkpoint(money, request_id, ingress))
            )
            killer.start()
            for line in response.iter_lines():  # the client reads at its own pace
                if '"error"' in line or line == "data: [DONE]":
                    ended_by = line[:200]
                    break
                delivered = usage_of(line) or delivered
    except Exception as exc:  # the connection is cut: the SDK's transport says so its own way
        ended_by = repr(exc)
    killer.join()
    assert killed[0] >= CHECKPOINT_TOKENS, f"the stream ended first: {ended_by}, {delivered}"
    # the stream is cut short: an error event, or the connection ends (never a clean end)
    assert delivered["completion_tokens"] < MAX_TOKENS, "the stream ran to its end"
    assert ended_by != "data: [DONE]", delivered
    # the hold outlives its ingress, with the last checkpoint of what was sent: no more than
    # the client received
    hold = {k.decode(): v.decode() for k, v in money.hgetall(rk.hold(request_id)).items()}
    assert hold, "the hold was settled or reaped already"
    checkpoint = int(hold["cp_prompt"]), int(hold["cp_completion"])
    assert hold["cp_provider"] == provider
    assert killed[0] <= checkpoint[1] <= delivered["completion_tokens"], (checkpoint, delivered)
    assert checkpoint[0] == delivered["prompt_tokens"]
    killed_at = time.monotonic()

    # Serve starts another ingress replica; the reaper settles the hold, the meter records it
    assert wait_for(lambda: get(platform, key, "/credits").status_code == 200, 180)
    assert ingress_process().pid != ingress.pid
    engine = make_engine(Settings(data_dir=Path(platform.env["DARKGPU_DATA_DIR"])).database_url)
    try:

        def recorded() -> UsageEvent | None:
            with Session(engine) as session:
                return session.scalar(select(UsageEvent).where(UsageEvent.request_id == request_id))

        row = wait_for(recorded, HOLD_TTL_S + 60)
        print(f"\nbilled {time.monotonic() - killed_at:.1f} s after the cut: {checkpoint}")
        assert row is not None, "the orphaned hold was never billed"
        assert row.outcome == "reaped"
        assert (row.prompt_tokens, row.completion_tokens) == checkpoint
        assert row.provider_id == provider
        cost = checkpoint[0] * pin + checkpoint[1] * pout
        assert row.cost_nusd == cost > 0
        # the provider earned its share of it, which is all it earned here
        assert earnings.totals(engine, provider).payable_nusd == split_cost(cost)[0]
    finally:
        engine.dispose()
    assert start - get(platform, key, "/credits").json()["balance_nusd"] == cost
    assert not money.exists(rk.hold(request_id)) and money.zscore(rk.HOLDS, request_id) is None
    verified = platform.admin("ledger", "verify")
    assert verified["ok"], verified
    # the new replica serves, and bills, as before
    answer = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4,
                                            extra_body=EXACT)  # fmt: skip
    assert answer.usage.completion_tokens == 4
    money.close()
