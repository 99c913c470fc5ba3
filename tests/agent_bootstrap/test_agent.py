"""The agent's loop with its side effects injected: recorded NVML readings, a process table,
a recording platform, Ray's command line with a recording runner, and a hand-moved clock."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent_bootstrap.agent import Agent, AgentDeps, Phase, RayCli
from agent_bootstrap.api import PlatformAuthError, PlatformError
from agent_bootstrap.config import ProviderConfig
from agent_bootstrap.credentials import Credentials
from agent_bootstrap.evidence import bound_nonce
from agent_bootstrap.idle import ProcInfo
from agent_bootstrap.keys import load_or_create
from agent_bootstrap.nvml import GpuReading, GpuUnavailable, RecordedReader
from agent_bootstrap.schedule import Window
from tests.agent_bootstrap.proc_tables import StaticProcTable
from tests.cluster.cc_pki import DevicePki
from tests.cluster.nvml_readings import GAME, H100, H100_CC_ON, NO_DRIVER, VLLM, h100_with

MONDAY = datetime(2030, 1, 7, tzinfo=UTC)
PROCS = StaticProcTable(
    [
        ProcInfo(900, 1, 1000, "raylet", "/venv/lib/ray/core/src/ray/raylet/raylet"),
        ProcInfo(VLLM.pid, 900, 1000, "ray::ServeRepli", "ray::ServeReplica:llm-qwen"),
        ProcInfo(GAME.pid, 1, 1000, "game", "/usr/games/game"),
    ]
)
CREDENTIALS = Credentials(
    api_url="http://platform",
    provider_id="prv_00aa11bb22cc33dd",
    provider_token="dgpp-" + "t" * 43,
    cluster_address="10.8.0.1:6380",
    ray_auth_token="ray-token",
    heartbeat_interval_s=3600,  # so the tests see only the heartbeats a phase change sends
)


class Clock:
    def __init__(self, start: datetime) -> None:
        self.at = start

    def __call__(self) -> datetime:
        return self.at

    def set(self, day_offset: int, hhmm: str) -> None:
        h, m = map(int, hhmm.split(":"))
        self.at = MONDAY + timedelta(days=day_offset, hours=h, minutes=m)

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


class Platform:
    def __init__(self, tier: str = "basic") -> None:
        self.tier = tier
        self.registered: list[dict[str, Any]] = []
        self.beats: list[tuple[str, str | None]] = []
        self.challenges: list[str] = []
        self.fail_with: Exception | None = None
        self.exchanges = 0
        self.tickets: list[str] = []
        self.bound: list[tuple[str, str]] = []
        self.models: list[list[str]] = []  # the allow-list sent with each binding
        self.refuse_binding: Exception | None = None

    def challenge(self) -> str:
        value = base64.urlsafe_b64encode(b"c" * 40).decode()
        self.challenges.append(value)
        return value

    def register(self, body: dict[str, Any]) -> dict[str, Any]:
        self.registered.append(body)
        return {"trust_tier": self.tier, "tier_reason": "test"}

    def heartbeat(self, status: str, reason: str | None = None) -> dict[str, Any]:
        if self.fail_with is not None:
            raise self.fail_with
        self.beats.append((status, reason))
        return {"status": status}

    def exchange(self) -> dict[str, Any]:
        self.exchanges += 1
        return {"cluster_address": "10.8.0.1:6380", "ray_auth_token": "rotated-token",
                "review": "approved"}  # fmt: skip

    def join_ticket(self) -> str:
        self.tickets.append(f"dgpj-{len(self.tickets)}")
        return self.tickets[-1]

    def market(self) -> dict[str, Any]:
        return {"object": "market", "models": [{"model": "qwen3.5-7b"}, {"model": "llama-3.1-8b"}]}

    def bind_node(self, ticket: str, node_id: str, models: Sequence[str] = ()) -> dict[str, Any]:
        if self.refuse_binding is not None:
            raise self.refuse_binding
        self.bound.append((ticket, node_id))
        self.models.append(list(models))
        return {"node_id": node_id}

    @property
    def statuses(self) -> list[str]:
        return [s for s, _ in self.beats]


class Runner:
    """Records Ray's commands; answers the node-id helper with a node id."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.commands: list[list[str]] = []
        self.envs: list[dict[str, str]] = []
        self.fail = fail or set()

    def __call__(self, command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        self.commands.append(command)
        self.envs.append(env)
        verb = command[1] if command[0] == "ray" else "node-id"
        if verb in self.fail:
            return subprocess.CompletedProcess(command, 1, "", f"{verb}: connection refused")
        out = "a1b2c3d4e5f6\n" if verb == "node-id" else ""
        return subprocess.CompletedProcess(command, 0, out, "")

    @property
    def verbs(self) -> list[str]:
        return [c[1] if c[0] == "ray" else "node-id" for c in self.commands]


def make_agent(
    tmp_path: Path,
    readings: list[GpuReading | BaseException],
    config: ProviderConfig,
    clock: Clock,
    runner: Runner | None = None,
    platform: Platform | None = None,
    reader: RecordedReader | None = None,
) -> tuple[Agent, Platform, Runner]:
    platform = platform or Platform()
    runner = runner or Runner()
    deps = AgentDeps(
        gpu=reader or RecordedReader(readings),
        procs=PROCS,
        platform=platform,
        ray=RayCli(tmp_path / "ray_auth_token", run=runner, ray="ray", python="py"),
        now=clock,
        log=lambda line: None,
        own_pids={12345},
    )
    agent = Agent(config, CREDENTIALS, load_or_create(tmp_path / "x25519.key"), deps)
    return agent, platform, runner


def test_joins_inside_the_window_and_drains_and_leaves_outside_it(tmp_path: Path) -> None:
    nights = Window(days=("mon",), start="22:00", end="08:00")
    config = ProviderConfig(schedule=[nights], timezone="UTC", drain_timeout_s=120)
    clock = Clock(MONDAY)
    readings = [H100, H100, H100, h100_with(VLLM), h100_with(VLLM), H100]
    agent, platform, runner = make_agent(tmp_path, readings, config, clock)
    agent.start()
    assert platform.registered[0]["gpu"]["name"] == "NVIDIA H100 80GB HBM3"
    assert platform.registered[0]["schedule"] == [
        {"days": ["mon"], "start": "22:00", "end": "08:00"}
    ]

    clock.set(0, "21:00")
    assert agent.tick() is Phase.out and runner.commands == []
    assert agent.reason == "outside the schedule"

    clock.set(0, "22:00")
    assert agent.tick() is Phase.joined
    # a ticket before `ray start`, redeemed with the node's id after it
    assert platform.bound == [("dgpj-0", "a1b2c3d4e5f6")]
    assert runner.commands[0] == [
        "ray",
        "start",
        "--address",
        "10.8.0.1:6380",
        "--labels",
        "darkgpu.io/provider-id=prv_00aa11bb22cc33dd,darkgpu.io/trust-tier=basic,"
        "darkgpu.io/gpu-model=NVIDIA_H100_80GB_HBM3",
        "--resources",
        # no `models` in its provider.toml: every catalog model (Ray places what fits)
        json.dumps(
            {
                "vram_gb": 80,
                "darkgpu_model:llama-3.1-8b": 1000.0,
                "darkgpu_model:qwen3.5-7b": 1000.0,
            }
        ),  # fmt: skip
        "--disable-usage-stats",
    ]
    assert runner.envs[0]["RAY_AUTH_MODE"] == "token"
    assert runner.envs[0]["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "ray_auth_token")

    clock.set(1, "08:00")  # the window closes; our replica is still on the GPU
    assert agent.tick() is Phase.draining
    assert runner.verbs == ["start", "node-id", "drain-node"]
    drain = runner.commands[-1]
    assert drain[drain.index("--node-id") + 1] == "a1b2c3d4e5f6"
    assert drain[drain.index("--reason") + 1] == "DRAIN_NODE_REASON_PREEMPTION"
    assert drain[drain.index("--deadline-remaining-seconds") + 1] == "120"
    assert drain[drain.index("--address") + 1] == "10.8.0.1:6380"
    assert runner.envs[1]["RAY_ADDRESS"] == "10.8.0.1:6380"

    clock.advance(5)
    assert agent.tick() is Phase.draining  # in-flight requests still finishing
    clock.advance(5)
    assert agent.tick() is Phase.out  # our processes left the GPU: stop the node
    assert runner.verbs == ["start", "node-id", "drain-node", "stop"]
    assert platform.statuses == ["paused", "online", "draining", "paused"]


def test_a_foreign_process_drains_the_node_and_it_rejoins_after_idle(tmp_path: Path) -> None:
    config = ProviderConfig(idle_rejoin_after_s=600)
    clock = Clock(MONDAY)
    readings = [
        H100,  # detection
        H100,  # t=0: join
        h100_with(GAME, VLLM),  # t=5: the owner starts a game → drain
        h100_with(GAME, VLLM),  # t=10: still draining
        h100_with(GAME),  # t=15: our replica is gone → leave
        H100,  # t=20: the game ended; idle since now
        H100,  # t=500: not yet
        H100,  # t=620: idle for 600 s → rejoin
    ]
    agent, platform, runner = make_agent(tmp_path, readings, config, clock)
    agent.start()
    phases = []
    for t in (0, 5, 10, 15, 20, 500, 620):
        clock.at = MONDAY + timedelta(seconds=t)
        phases.append(agent.tick())
        if t == 5:
            assert agent.reason == "the GPU is in use by game (pid 4242)"
        if t == 500:
            assert agent.reason.startswith("waiting for the GPU to stay idle (120 s")
    assert phases == [
        Phase.joined,
        Phase.draining,
        Phase.draining,
        Phase.out,
        Phase.out,
        Phase.out,
        Phase.joined,
    ]
    assert runner.verbs == ["start", "node-id", "drain-node", "stop", "start", "node-id"]
    assert platform.statuses == ["online", "draining", "paused", "online"]
    assert [ticket for ticket, _ in platform.bound] == ["dgpj-0", "dgpj-1"]  # one per join


def test_the_drain_deadline_bounds_the_wait(tmp_path: Path) -> None:
    config = ProviderConfig(drain_timeout_s=60)
    clock = Clock(MONDAY)
    readings = [H100, H100, h100_with(GAME, VLLM)]  # our replica never leaves by itself
    agent, _, runner = make_agent(tmp_path, readings, config, clock)
    agent.start()
    agent.tick()
    clock.advance(1)
    assert agent.tick() is Phase.draining
    clock.advance(59)
    assert agent.tick() is Phase.draining
    clock.advance(1)
    assert agent.tick() is Phase.out and runner.verbs[-1] == "stop"


def test_without_idle_detection_foreign_processes_do_not_matter(tmp_path: Path) -> None:
    config = ProviderConfig(idle_detection=False)
    agent, _, runner = make_agent(tmp_path, [H100, h100_with(GAME)], config, Clock(MONDAY))
    agent.start()
    assert agent.tick() is Phase.joined
    assert agent.tick() is Phase.joined and runner.verbs == ["start", "node-id"]


def test_a_failed_ray_start_stays_out_and_retries(tmp_path: Path) -> None:
    runner = Runner(fail={"start"})
    agent, platform, _ = make_agent(tmp_path, [H100], ProviderConfig(), Clock(MONDAY), runner)
    agent.start()
    assert agent.tick() is Phase.out
    assert agent.reason.startswith("could not join the cluster: ray start failed (1)")
    assert platform.beats[-1] == ("paused", agent.reason)
    runner.fail.clear()
    assert agent.tick() is Phase.joined
    # the failure may be a rotated cluster token: the agent asked for the credentials again
    assert platform.exchanges == 1 and agent.credentials.ray_auth_token == "rotated-token"


def test_a_failed_drain_stops_the_node(tmp_path: Path) -> None:
    runner = Runner(fail={"drain-node"})
    readings = [H100, H100, h100_with(GAME)]
    agent, _, _ = make_agent(tmp_path, readings, ProviderConfig(), Clock(MONDAY), runner)
    agent.start()
    agent.tick()
    assert agent.tick() is Phase.out and runner.verbs[-1] == "stop"


def test_nvml_failing_mid_run_leaves_the_cluster(tmp_path: Path) -> None:
    readings: list[GpuReading | BaseException] = [H100, H100, NO_DRIVER]
    agent, _, runner = make_agent(tmp_path, readings, ProviderConfig(), Clock(MONDAY))
    agent.start()
    agent.tick()
    assert agent.tick() is Phase.draining and agent.reason.startswith("NVML failed")
    assert agent.tick() is Phase.out and runner.verbs[-1] == "stop"


def test_no_driver_refuses_to_start(tmp_path: Path) -> None:
    agent, platform, _ = make_agent(tmp_path, [NO_DRIVER], ProviderConfig(), Clock(MONDAY))
    with pytest.raises(GpuUnavailable, match="No NVIDIA driver"):
        agent.start()
    assert platform.registered == []


def test_with_cc_on_the_registration_carries_evidence_bound_to_the_key(tmp_path: Path) -> None:
    pki = DevicePki.make()
    reader = RecordedReader([H100_CC_ON], report_signer=pki.sign_report)
    platform = Platform(tier="verified")
    agent, _, runner = make_agent(
        tmp_path, [], ProviderConfig(), Clock(MONDAY), platform=platform, reader=reader
    )
    agent.start()
    body = platform.registered[0]
    assert body["cc_state"] == "on"
    challenge = base64.urlsafe_b64decode(platform.challenges[0])
    expected = bound_nonce(agent.key.public_bytes, challenge)
    assert body["cc_evidence"]["nonce"] == expected.hex()
    report = base64.b64decode(body["cc_evidence"]["gpus"][0]["report"])
    assert report[4:36] == expected
    agent.tick()
    assert (
        "darkgpu.io/trust-tier=verified"
        in runner.commands[0][runner.commands[0].index("--labels") + 1]
    )


def test_the_node_ip_address_goes_to_ray_start(tmp_path: Path) -> None:
    config = ProviderConfig(node_ip_address="10.8.0.2")
    agent, _, runner = make_agent(tmp_path, [H100], config, Clock(MONDAY))
    agent.start()
    agent.tick()
    assert runner.commands[0][-2:] == ["--node-ip-address", "10.8.0.2"]


def test_the_models_the_provider_allows_go_with_the_binding(tmp_path: Path) -> None:
    config = ProviderConfig(models=["llama-3.1-8b", "qwen3.5-7b"])
    agent, platform, _ = make_agent(tmp_path, [H100], config, Clock(MONDAY))
    agent.start()
    agent.tick()
    assert platform.models == [["llama-3.1-8b", "qwen3.5-7b"]]


def test_a_node_declares_only_the_models_its_provider_allows(tmp_path: Path) -> None:
    """Ray places a model's replica only where its resource is declared."""
    config = ProviderConfig(models=["qwen3.5-7b"])
    agent, _, runner = make_agent(tmp_path, [H100], config, Clock(MONDAY))
    agent.start()
    agent.tick()
    start = runner.commands[0]
    resources = json.loads(start[start.index("--resources") + 1])
    assert resources == {"vram_gb": 80, "darkgpu_model:qwen3.5-7b": 1000.0}


def test_heartbeat_failures_do_not_stop_the_loop_but_a_revoked_token_does(
    tmp_path: Path,
) -> None:
    clock = Clock(MONDAY)
    readings = [H100, H100, h100_with(VLLM), H100]
    agent, platform, runner = make_agent(tmp_path, readings, ProviderConfig(), clock)
    agent.start()
    platform.fail_with = PlatformError(0, "cannot reach the platform")
    assert agent.tick() is Phase.joined  # joined all the same
    platform.fail_with = PlatformAuthError(401, "revoked", "revoked_provider_token")
    ticks = 0

    def should_stop() -> bool:
        return False

    def sleep(_: float) -> None:
        nonlocal ticks
        ticks += 1
        clock.advance(5)

    agent.deps.sleep = sleep
    with pytest.raises(PlatformAuthError):
        agent.run(should_stop)
    assert runner.verbs[-3:] == ["node-id", "drain-node", "stop"]  # left the cluster anyway
    assert agent.phase is Phase.out


def test_run_until_stopped_then_leaves_and_says_offline(tmp_path: Path) -> None:
    clock = Clock(MONDAY)
    agent, platform, runner = make_agent(tmp_path, [H100], ProviderConfig(), clock)
    stops = iter([False, False, True])
    agent.deps.sleep = lambda s: clock.advance(s)
    agent.run(lambda: next(stops))
    assert runner.verbs == ["start", "node-id", "drain-node", "stop"]
    assert platform.statuses == ["online", "draining", "offline"]


def test_a_node_the_platform_will_not_bind_leaves_again(tmp_path: Path) -> None:
    """Unbound, the node would get no traffic and be drained: the agent stops it and says
    why, and tries again on a later tick with a fresh ticket."""
    platform = Platform()
    platform.refuse_binding = RuntimeError("The node is not labelled as your provider.")
    agent, _, runner = make_agent(tmp_path, [H100, H100, H100], ProviderConfig(), Clock(MONDAY),
                                  platform=platform)  # fmt: skip
    agent.start()
    assert agent.tick() is Phase.out
    assert runner.verbs == ["start", "node-id", "stop"]
    assert agent.reason.startswith("could not bind this node to the provider: The node is not")
    platform.refuse_binding = None
    exchanges = platform.exchanges
    assert agent.tick() is Phase.joined
    assert platform.bound == [("dgpj-1", "a1b2c3d4e5f6")]
    # it asked for its credentials again: the node is looked up in its tier's pool, which
    # may not be the one it joined (its tier changed)
    assert platform.exchanges == exchanges + 1
    assert agent.credentials.ray_auth_token == "rotated-token"
