"""Which models are online, as the ingress's `ReplicaAvailability` sees them, on a real Serve.

A Ray cluster of this module's own (`ray.init(address="local")`: never another test's) runs
one application with two deployments: `Gate`, standing for a model's replica, whose
constructor waits until a file exists (so the test decides when a replica may start), and
`Probe`, standing for the ingress: a replica that holds a `ReplicaAvailability` for `Gate`
and answers what it reads. A replica still starting is offline; once it runs it is online;
its process SIGKILLed, it is offline while its replacement starts; once that runs, online.
A model whose application does not exist yet (`Late`, in an application of its own, as the
supply reconciler deploys each model) is offline; deployed, online; deleted, offline again.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve

from serve_app.availability import ReplicaAvailability

ROOT = Path(__file__).resolve().parents[2]
APP = "availability"
LATE_APP = "late-model"


@serve.deployment(health_check_period_s=1, health_check_timeout_s=5)
class Gate:
    """A model replica that may start only while `door` exists."""

    def __init__(self, door: str) -> None:
        while not os.path.exists(door):
            time.sleep(0.1)

    def pid(self) -> int:
        return os.getpid()


@serve.deployment
class Probe:
    """The ingress's view: `ReplicaAvailability` of `Gate` (as the model "m") in a replica."""

    def __init__(self, gate: Any) -> None:
        self._gate = gate
        self._availability = ReplicaAvailability(
            {"m": (serve.get_replica_context().app_name, "Gate"), "late": (LATE_APP, "Late")}
        )
        self._late: Any = None

    async def call_late(self) -> str:
        """Through a handle got once and kept, as the pool's gateway keeps one per model."""
        if self._late is None:
            self._late = serve.get_deployment_handle("Late", LATE_APP)
        return str(await self._late.remote())

    async def online(self) -> list[str]:
        return sorted(await self._availability.online())

    async def gate_pid(self) -> int:
        return int(await self._gate.pid.remote())


@serve.deployment
class Late:
    def __call__(self) -> str:
        return "ok"


def wait_for(check: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    serve.start(http_options={"location": "NoServer"})
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@dataclass
class Probed:
    probe: Any  # the Probe's handle
    door: Path  # while it exists, a Gate replica may start

    def online(self) -> list[str]:
        return self.probe.online.remote().result(timeout_s=30)  # type: ignore[no-any-return]


@pytest.fixture
def probed(cluster: None, tmp_path: Path) -> Probed:
    door = tmp_path / "door"
    door.touch()
    probed = Probed(serve.run(Probe.bind(Gate.bind(str(door))), name=APP, route_prefix=None), door)
    wait_for(lambda: probed.online() == ["m"])
    return probed


def test_online_follows_the_replica_through_start_death_and_restart(probed: Probed) -> None:
    pid = probed.probe.gate_pid.remote().result(timeout_s=30)

    # The replica's process dies; its replacement may not start until the door is back.
    probed.door.unlink()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: probed.online() == [])
    assert probed.online() == []

    probed.door.touch()
    wait_for(lambda: probed.online() == ["m"])
    assert probed.probe.gate_pid.remote().result(timeout_s=30) != pid


def test_a_model_application_deployed_later_comes_online_and_goes_with_it(
    probed: Probed,
) -> None:
    serve.run(Late.bind(), name=LATE_APP, route_prefix=None)
    wait_for(lambda: probed.online() == ["late", "m"])
    assert probed.probe.call_late.remote().result(timeout_s=30) == "ok"
    serve.delete(LATE_APP)
    wait_for(lambda: probed.online() == ["m"])


def test_a_model_application_deleted_and_deployed_again_comes_online_and_is_served(
    probed: Probed,
) -> None:
    """As a model whose last provider left, deployed again when another joins: online again,
    and a handle kept from before (the pool gateway keeps one per model) reaches it."""
    serve.run(Late.bind(), name=LATE_APP, route_prefix=None)
    wait_for(lambda: probed.online() == ["late", "m"])
    assert probed.probe.call_late.remote().result(timeout_s=30) == "ok"
    serve.delete(LATE_APP)
    wait_for(lambda: probed.online() == ["m"])
    serve.run(Late.bind(), name=LATE_APP, route_prefix=None)
    wait_for(lambda: probed.online() == ["late", "m"])
    assert probed.probe.call_late.remote().result(timeout_s=30) == "ok"
