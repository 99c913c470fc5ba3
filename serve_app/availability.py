"""Which models have a replica online now, read from Serve's status and kept fresh.

Requests never wait on it: the status is read in a thread at most every `ttl_s` seconds,
and a request uses the last reading.
"""

from __future__ import annotations

import asyncio
import time

from ray import serve
from ray.serve.schema import ReplicaState


class ReplicaAvailability:
    def __init__(self, app_name: str, deployments: dict[str, str], ttl_s: float = 1.0) -> None:
        self._app_name = app_name
        self._deployments = deployments  # model id -> deployment name
        self._ttl_s = ttl_s
        self._online: frozenset[str] = frozenset()
        self._read_at = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    async def online(self) -> frozenset[str]:
        if time.monotonic() - self._read_at > self._ttl_s:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.create_task(self._refresh())
            if self._read_at == 0.0 or not self._online:
                await asyncio.shield(self._refreshing)
        return self._online

    async def is_online(self, model_id: str) -> bool:
        return model_id in await self.online()

    async def _refresh(self) -> None:
        self._online = await asyncio.to_thread(self._read)
        self._read_at = time.monotonic()

    def _read(self) -> frozenset[str]:
        app = serve.status().applications.get(self._app_name)
        if app is None:
            return frozenset()
        online = set()
        for model_id, name in self._deployments.items():
            deployment = app.deployments.get(name)
            if deployment and deployment.replica_states.get(ReplicaState.RUNNING, 0) > 0:
                online.add(model_id)
        return frozenset(online)
