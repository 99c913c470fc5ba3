"""The node bindings as the ingress applies them (`cluster.nodes`): a replica gets traffic
only where the pool placed it on a node bound to the provider its stats name, or, for the
platform's own (`local`) replicas, on a control node.

Where a replica runs comes from the pool's GCS, as the pool's gateway lists it
(`serve_app.pool_replicas`), never from what the replica says; the bindings from SQL, read in
a thread at most every `ttl_s` seconds. Until a first reading succeeds no replica is allowed
(closed, not open: a provider's node must not get traffic it was never bound for because a
read failed); a failed later reading keeps the one before.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy.engine import Engine

from cluster import nodes

logger = logging.getLogger("darkgpu.nodes")


class NodeBindings:
    def __init__(self, engine: Engine, control_nodes: frozenset[str], ttl_s: float = 1.0) -> None:
        self._engine = engine
        self._control = control_nodes
        self._ttl_s = ttl_s
        self._bound: dict[str, str] = {}  # node id -> provider id
        self._read_at = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    def allows(self, node_id: str, provider_id: str) -> bool:
        """Whether a replica the pool placed on `node_id` may serve as `provider_id`."""
        return nodes.allowed(provider_id, node_id, self._bound, self._control)

    async def refresh(self) -> None:
        """Read again when the last reading is older than `ttl_s` (waits for the first)."""
        if time.monotonic() - self._read_at <= self._ttl_s:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh())
        if self._read_at == 0.0:
            await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        try:
            self._bound = await asyncio.to_thread(nodes.bindings, self._engine)
        except Exception as exc:  # noqa: BLE001 - keep the last reading
            logger.warning("reading the node bindings failed: %r", exc)
            return
        self._read_at = time.monotonic()
