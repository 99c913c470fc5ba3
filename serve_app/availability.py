"""Which models have a replica online now, pushed by Serve's controller as it changes.

Serve's controller broadcasts each deployment's running replicas over its long poll (the
`DEPLOYMENT_TARGETS` key its request routers subscribe to) whenever that set changes: a
replica that starts, dies, fails its health check or is drained. We subscribe to the same
key, so a request reads a set kept in memory (no call per request) and the replica pays no
call per second either: one `listen_for_change` waits at the controller until something
changes (or times out after 30-60 s and is sent again).

`serve.status()`, polled once a second before, made the controller build the whole
instance's details and this replica cloudpickle the request-router config: about 200 ms of
CPU under the GIL in every ingress replica each second (issue 13).

The long-poll client is Serve's own (the one every `DeploymentHandle`'s router uses, through
`cluster.ray_internals`); `tests/serve_app/test_availability.py` keeps it honest against a
real Serve.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import ray

from cluster.ray_internals import (
    SERVE_CONTROLLER_NAME,
    SERVE_NAMESPACE,
    DeploymentID,
    DeploymentTargetInfo,
    LongPollClient,
    LongPollNamespace,
)

log = logging.getLogger(__name__)

# How long the first reading may keep a caller waiting: a deployment that has never had a
# replica is never broadcast, so the first answer may name only some of the models.
FIRST_READING_WAIT_S = 2.0
# A client whose controller went away (it restarts: the handle stays valid) is started
# again at most this often, by the next caller.
RESTART_EVERY_S = 1.0


class ReplicaAvailability:
    """The models of `deployments` (model id -> its application and deployment names) that
    have at least one replica Serve would route a request to. A deployment need not exist
    yet: it is online from the moment Serve pushes a running replica of it (each model is an
    application the supply reconciler deploys and deletes: `serve_app.supply`).
    `on_online(model_id)` is called on the event loop as a model comes online."""

    def __init__(
        self,
        deployments: Mapping[str, tuple[str, str]],
        on_online: Callable[[str], object] | None = None,
    ) -> None:
        self._models = {
            DeploymentID(name=name, app_name=app_name): model_id
            for model_id, (app_name, name) in deployments.items()
        }
        self._on_online = on_online
        self._running: dict[str, int] = {}  # model id -> running replicas, as last told
        self._online: frozenset[str] = frozenset()
        self._client: LongPollClient | None = None
        self._started_at = 0.0
        self._first = asyncio.Event()

    async def online(self) -> frozenset[str]:
        """The models with a replica online: the set last pushed; only the very first call
        (or the first after the controller restarted) waits, for its first reading."""
        if self._client is None or not self._client.is_running:
            self._start()
        if not self._first.is_set():
            try:
                await asyncio.wait_for(self._first.wait(), FIRST_READING_WAIT_S)
            except TimeoutError:
                pass  # no model has ever had a replica: none is online
        return self._online

    async def is_online(self, model_id: str) -> bool:
        return model_id in await self.online()

    def stop(self) -> None:
        """Stop listening (after the call in flight returns)."""
        if self._client is not None:
            self._client.stop()

    def _start(self) -> None:
        now = time.monotonic()
        if self._client is not None and now - self._started_at < RESTART_EVERY_S:
            return
        self._started_at = now
        if self._client is not None:
            log.warning("Serve's long poll stopped; listening for replicas again")
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        listeners: dict[Any, Any] = {
            (LongPollNamespace.DEPLOYMENT_TARGETS, deployment): (
                lambda info, model_id=model_id: self._update(model_id, info)
            )
            for deployment, model_id in self._models.items()
        }
        self._client = LongPollClient(
            controller,
            listeners,
            call_in_event_loop=asyncio.get_running_loop(),
            client_id=f"darkgpu-availability:{ray.get_runtime_context().get_worker_id()}",
        )

    def _update(self, model_id: str, info: DeploymentTargetInfo) -> None:
        """Called on this replica's event loop with a deployment's new running set."""
        running = len(info.running_replicas) if info.is_available else 0
        if running != self._running.get(model_id):
            log.info(
                "%s: %d replicas running (available: %s)", model_id, running, info.is_available
            )
        self._running[model_id] = running
        was = model_id in self._online
        self._online = frozenset(m for m, n in self._running.items() if n > 0)
        self._first.set()
        if not was and model_id in self._online and self._on_online is not None:
            self._on_online(model_id)
