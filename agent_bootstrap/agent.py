"""`darkgpu serve`: the agent's loop.

detect the GPU (agent_bootstrap.nvml: refuses without a driver ≥ 535 / CUDA ≥ 12) → the X25519 key
→ provider.toml → register (GPU facts, key, price floor, schedule; CC evidence when CC is
on) → then every few seconds:

- when the schedule is open and the GPU is idle (no other user's process, or none for
  `idle_rejoin_after_s` since the last one): join the cluster,
  `ray start --address … --labels … --resources '{"vram_gb": N}'`;
- when the window closes, or another user's process appears on the GPU: drain the node
  (`ray drain-node … --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds`:
  Ray schedules nothing new there and Serve moves the replicas to other nodes while
  in-flight requests finish), then, once our processes have left the GPU or the drain
  deadline has passed, `ray stop`;
- heartbeat the platform with the status (online, draining, paused; offline on exit).

Only an approved provider joins: a pending one registers and heartbeats and waits (the
platform's answers carry the operator's `review`), then asks for the cluster's credentials;
a suspended or revoked one drains and leaves like a closed window.

Every side effect goes through `AgentDeps` (GPU reader, process table, platform client, Ray
node, clock, sleep, log), so the loop runs in tests with recorded readings and fakes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import pynvml

from agent_bootstrap.api import PlatformAuthError
from agent_bootstrap.config import ProviderConfig
from agent_bootstrap.credentials import Credentials
from agent_bootstrap.evidence import make_evidence
from agent_bootstrap.idle import Classified, IdleDetector, ProcTable, classify
from agent_bootstrap.keys import KeyPair
from agent_bootstrap.nvml import Detection, GpuReader, GpuUnavailable, detect
from agent_bootstrap.schedule import is_open
from kernel.gpu import CcState
from kernel.labels import (
    VRAM_RESOURCE,
    NodeIdentity,
    TrustTier,
    format_labels,
    model_resources,
)

DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"
APPROVED = "approved"
REVIEW_WORDS = {
    "pending": "waiting for the operator's approval",
    "suspended": "the operator suspended it",
    "revoked": "the operator revoked it",
}
POLL_INTERVAL_S = 5.0


class Phase(StrEnum):
    out = "out"  # not in the cluster
    joined = "joined"  # in the cluster, serving
    draining = "draining"  # asked to drain; leaving once our processes are gone


HEARTBEAT_STATUS = {Phase.out: "paused", Phase.joined: "online", Phase.draining: "draining"}


# --- Ray -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSpec:
    address: str
    labels: dict[str, str]
    resources: dict[str, float]
    node_ip_address: str | None = None


def node_spec(
    address: str,
    provider_id: str,
    tier: TrustTier,
    detection: Detection,
    node_ip_address: str | None = None,
    models: Sequence[str] = (),
) -> NodeSpec:
    """How the node joins: its labels, its VRAM, and a resource for each catalog model it
    serves (`models`), without which Ray places no replica of that model on it."""
    identity = NodeIdentity(
        provider_id=provider_id, trust_tier=tier, gpu_model=detection.name.replace(" ", "_")
    )
    return NodeSpec(
        address=address,
        labels=identity.labels(),
        resources={VRAM_RESOURCE: detection.vram_gb_resource, **model_resources(models)},
        node_ip_address=node_ip_address,
    )


def ray_start_command(ray: str, spec: NodeSpec) -> list[str]:
    command = [
        ray, "start",
        "--address", spec.address,
        "--labels", format_labels(spec.labels),
        "--resources", json.dumps(spec.resources),
        "--disable-usage-stats",
    ]  # fmt: skip
    if spec.node_ip_address:
        command += ["--node-ip-address", spec.node_ip_address]
    return command


def ray_drain_command(
    ray: str, address: str, node_id: str, message: str, deadline_s: int
) -> list[str]:
    return [
        ray, "drain-node",
        "--address", address,
        "--node-id", node_id,
        "--reason", DRAIN_REASON,
        "--reason-message", message,
        "--deadline-remaining-seconds", str(deadline_s),
    ]  # fmt: skip


def ray_env(token_path: Path) -> dict[str, str]:
    """Token authentication on (the cluster requires it), the token from the agent's file."""
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0",
    }


class RayNode(Protocol):
    def join(self, spec: NodeSpec) -> None: ...

    def node_id(self) -> str: ...

    def drain(self, message: str, deadline_s: int) -> None: ...

    def leave(self) -> None: ...


Runner = Callable[[list[str], dict[str, str]], "subprocess.CompletedProcess[str]"]


def run_command(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, check=False
    )


class RayError(RuntimeError):
    pass


def ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


class RayCli:
    """The node through Ray's command line; `run` is injectable (tests record commands)."""

    def __init__(
        self,
        token_path: Path,
        run: Runner = run_command,
        ray: str | None = None,
        python: str = sys.executable,
    ) -> None:
        self._env = ray_env(token_path)
        self._run = run
        self._ray = ray or ray_executable()
        self._python = python
        self._address: str | None = None
        self._node_id: str | None = None

    def _check(self, command: list[str], what: str) -> str:
        done = self._run(command, self._env)
        if done.returncode != 0:
            detail = (done.stderr or done.stdout or "").strip().splitlines()[-3:]
            raise RayError(f"{what} failed ({done.returncode}): {' '.join(detail)}")
        return done.stdout or ""

    def join(self, spec: NodeSpec) -> None:
        self._check(ray_start_command(self._ray, spec), "ray start")
        self._address = spec.address
        self._node_id = None

    def node_id(self) -> str:
        if self._node_id is None:
            command = [self._python, "-m", "agent_bootstrap.ray_node_id"]
            env_address = {"RAY_ADDRESS": self._address or "auto"}
            done = self._run(command, {**self._env, **env_address})
            lines = (done.stdout or "").strip().splitlines()
            if done.returncode != 0 or not lines:
                raise RayError(f"cannot find this node's Ray id: {(done.stderr or '').strip()}")
            self._node_id = lines[-1].strip()
        return self._node_id

    def drain(self, message: str, deadline_s: int) -> None:
        command = ray_drain_command(
            self._ray, self._address or "auto", self.node_id(), message, deadline_s
        )
        self._check(command, "ray drain-node")

    def leave(self) -> None:
        self._check([self._ray, "stop"], "ray stop")
        self._node_id = None


# --- the platform ----------------------------------------------------------------------------


class Platform(Protocol):
    def exchange(self) -> dict[str, Any]: ...

    def challenge(self) -> str: ...

    def register(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def heartbeat(self, status: str, reason: str | None = None) -> dict[str, Any]: ...

    def join_ticket(self) -> str: ...

    def bind_node(
        self, ticket: str, node_id: str, models: Sequence[str] = ()
    ) -> dict[str, Any]: ...

    def market(self) -> dict[str, Any]: ...


def registration_body(detection: Detection, key: KeyPair, config: ProviderConfig) -> dict[str, Any]:
    return {
        **detection.facts(),
        "public_key": key.public_b64,
        "price_floor_pct": config.price_floor_pct,
        "schedule": [w.model_dump(mode="json") for w in config.schedule] or None,
        "schedule_timezone": config.timezone,
    }


# --- the loop --------------------------------------------------------------------------------


@dataclass
class AgentDeps:
    gpu: GpuReader
    procs: ProcTable
    platform: Platform
    ray: RayNode
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    sleep: Callable[[float], None] = field(default=lambda s: None)
    log: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    own_pids: set[int] = field(default_factory=lambda: {os.getpid()})
    # keeps credentials the platform hands over once the provider is approved
    save_credentials: Callable[[Credentials], object] = field(default=lambda c: None)


class Agent:
    def __init__(
        self,
        config: ProviderConfig,
        credentials: Credentials,
        key: KeyPair,
        deps: AgentDeps,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self.config = config
        self.credentials = credentials
        self.key = key
        self.deps = deps
        self.poll_interval_s = poll_interval_s
        self.phase = Phase.out
        self.reason = "starting"
        self.tier = TrustTier.basic
        self.review = credentials.review  # the operator's word, as the platform last said
        self.detection: Detection | None = None
        self._idle = IdleDetector(config.idle_rejoin_after_s)
        self._drain_started = 0.0
        self._last_heartbeat = -float("inf")

    # --- start-up ------------------------------------------------------------------------

    def start(self) -> Detection:
        """Detect the GPU (GpuUnavailable when it cannot serve) and register."""
        self.detection = detect(self.deps.gpu)
        self.deps.log(f"GPU: {self.detection.summary()}")
        self.register()
        return self.detection

    def register(self) -> dict[str, Any]:
        assert self.detection is not None
        body = registration_body(self.detection, self.key, self.config)
        if self.detection.cc_state is CcState.on:
            try:
                body["cc_evidence"] = make_evidence(
                    self.deps.gpu,
                    self.key.public_bytes,
                    self.deps.platform.challenge(),
                    self.detection.gpu_count,
                ).model_dump()
            except pynvml.NVMLError as exc:
                self.deps.log(f"confidential computing is on but no report was made: {exc}")
        answer = self.deps.platform.register(body)
        self.tier = TrustTier(answer.get("trust_tier", TrustTier.basic))
        self._note_review(answer)
        self.deps.log(
            f"Registered as {self.credentials.provider_id}: trust tier {self.tier.value}"
            f" ({answer.get('tier_reason', '')}); {self.review}"
        )
        return answer

    def _note_review(self, answer: dict[str, Any]) -> None:
        review = str(answer.get("review", APPROVED))
        if review != self.review:
            self.deps.log(f"The platform says this provider is {review}.")
        self.review = review

    # --- each tick -----------------------------------------------------------------------

    def _look(self, now: float) -> tuple[bool, str, Classified | None]:
        """Whether the node should be in the cluster now, why not, and the GPU's processes."""
        try:
            processes = self.deps.gpu.processes()
        except pynvml.NVMLError as exc:
            return False, f"NVML failed: {exc}", None
        seen = classify(
            processes,
            self.deps.procs,
            own_pids=self.deps.own_pids,
            ignore_names=self.config.ignore_processes,
        )
        busy = self.config.idle_detection and bool(seen.foreign)
        may_serve = self._idle.update(busy, now)
        if self.review != APPROVED:
            words = REVIEW_WORDS.get(self.review, "")
            return False, f"the provider is {self.review}: {words}", seen
        if not is_open(self.config.schedule, self.deps.now(), self.config.timezone):
            return False, "outside the schedule", seen
        if busy:
            return False, f"the GPU is in use by {seen.describe_foreign()}", seen
        if not may_serve:
            wait = self._idle.rejoin_in(now) or 0
            return False, f"waiting for the GPU to stay idle ({wait:.0f} s more)", seen
        return True, "serving", seen

    def tick(self) -> Phase:
        moment = self.deps.now()
        now = moment.timestamp()
        want, why, seen = self._look(now)
        if self.phase is Phase.out and want:
            self._join()
        elif self.phase is Phase.joined and not want:
            self._drain(why, now)
        elif self.phase is Phase.draining:
            ours_left = seen is not None and bool(seen.ours)
            if not ours_left or now - self._drain_started >= self.config.drain_timeout_s:
                self._leave(why if not want else "drained")
        if self.phase is Phase.out and not want:
            self.reason = why
        self._heartbeat(now)
        return self.phase

    def _cluster_credentials(self) -> bool:
        """The cluster's address and Ray token, asked for once the provider is approved
        (`darkgpu auth` before approval got none); False when the platform gives none."""
        if self.credentials.ray_auth_token:
            return True
        try:
            answer = self.deps.platform.exchange()
            fresh = self.credentials.model_copy(update={
                k: answer.get(k) for k in ("cluster_address", "ray_auth_token", "review")
            })  # fmt: skip
        except Exception as exc:  # the platform being away must not stop the loop
            self.reason = f"could not get the cluster's credentials: {exc}"
            self.deps.log(self.reason)
            return False
        self._note_review(answer)
        if not fresh.ray_auth_token or not fresh.cluster_address:
            self.reason = f"no cluster credentials were given (the provider is {self.review})"
            return False
        self.credentials = fresh
        self.deps.save_credentials(fresh)
        return True

    def _join(self) -> None:
        assert self.detection is not None
        if not self._cluster_credentials():
            return
        assert self.credentials.cluster_address is not None
        try:
            ticket = self.deps.platform.join_ticket()
            models = self.config.models or self._catalog()
        except Exception as exc:  # the platform being away must not stop the loop
            self.reason = f"could not get a join ticket or the catalog: {exc}"
            self.deps.log(self.reason)
            return
        spec = node_spec(
            self.credentials.cluster_address,
            self.credentials.provider_id,
            self.tier,
            self.detection,
            self.config.node_ip_address,
            models,
        )
        try:
            self.deps.ray.join(spec)
        except RayError as exc:
            self.reason = f"could not join the cluster: {exc}"
            self.deps.log(self.reason)
            # the operator may have rotated the cluster's token or moved it: ask again
            self.credentials = self.credentials.model_copy(update={"ray_auth_token": None})
            return
        try:  # the node serves only once bound to this provider (cluster.nodes)
            self.deps.platform.bind_node(ticket, self.deps.ray.node_id(), self.config.models)
        except Exception as exc:  # unbound, it would get no traffic and be drained
            self._leave(f"could not bind this node to the provider: {exc}")
            # its tier's pool may have changed (the node is looked up there): ask again
            self.credentials = self.credentials.model_copy(update={"ray_auth_token": None})
            return
        self.phase, self.reason = Phase.joined, "serving"
        self._last_heartbeat = -float("inf")
        self.deps.log(f"Joined the cluster at {spec.address} ({spec.resources})")

    def _catalog(self) -> list[str]:
        """Every catalog model, for a provider.toml that names none (any that fits: Ray
        places only what fits the VRAM anyway); from the public market figures."""
        market = self.deps.platform.market()
        return [str(entry["model"]) for entry in market.get("models", [])]

    def _drain(self, why: str, now: float) -> None:
        self.deps.log(f"Leaving the cluster: {why}")
        try:
            self.deps.ray.drain(f"darkgpu agent: {why}", self.config.drain_timeout_s)
        except RayError as exc:
            self.deps.log(f"drain failed ({exc}); stopping the node")
            self._leave(why)
            return
        self.phase, self.reason = Phase.draining, why
        self._drain_started = now
        self._last_heartbeat = -float("inf")

    def _leave(self, why: str) -> None:
        try:
            self.deps.ray.leave()
        except RayError as exc:
            self.deps.log(f"ray stop failed: {exc}")
        self.phase, self.reason = Phase.out, why
        self._last_heartbeat = -float("inf")
        self.deps.log(f"Left the cluster: {why}")

    def _heartbeat(self, now: float) -> None:
        if now - self._last_heartbeat < self.credentials.heartbeat_interval_s:
            return
        try:
            answer = self.deps.platform.heartbeat(HEARTBEAT_STATUS[self.phase], self.reason)
        except PlatformAuthError:
            raise  # the token was revoked: `run` leaves the cluster and stops
        except Exception as exc:  # the platform being away must not stop the loop
            self.deps.log(f"heartbeat failed: {exc}")
            return
        self._last_heartbeat = now
        self._note_review(answer)  # a suspension drains the node on the next tick

    # --- the whole run -------------------------------------------------------------------

    def shutdown(self, why: str = "the agent is stopping") -> None:
        """Leave gracefully (drain, wait for our processes, stop) and say offline."""
        if self.phase is Phase.joined:
            now = self.deps.now().timestamp()
            self._drain(why, now)
            try:
                self._heartbeat(now)  # the platform sees `draining` while requests finish
            except PlatformAuthError:
                pass
        while self.phase is Phase.draining:
            now = self.deps.now().timestamp()
            _, _, seen = self._look(now)
            if (
                seen is None
                or not seen.ours
                or now - self._drain_started >= (self.config.drain_timeout_s)
            ):
                self._leave(why)
                break
            self.deps.sleep(self.poll_interval_s)
        try:
            self.deps.platform.heartbeat("offline", why)
        except Exception as exc:
            self.deps.log(f"final heartbeat failed: {exc}")

    def run(self, should_stop: Callable[[], bool]) -> None:
        if self.detection is None:
            self.start()
        try:
            while not should_stop():
                self.tick()
                self.deps.sleep(self.poll_interval_s)
        finally:
            self.shutdown()


__all__ = [
    "Agent",
    "AgentDeps",
    "GpuUnavailable",
    "NodeSpec",
    "Phase",
    "RayCli",
    "RayError",
    "node_spec",
    "ray_drain_command",
    "ray_start_command",
]
