"""The node bindings as the ingress applies them (`cluster.nodes`): a replica gets traffic
only where the cluster placed it on a node bound to the provider its stats name, or, for the
platform's own (`local`) replicas, on a control node.

Where a replica runs is read from the GCS's actor table (where the cluster placed the actor),
never from what the replica says; the bindings from SQL. Both are read in a thread at most
every `ttl_s` seconds; a request uses the last reading. Until a first reading succeeds no
replica is allowed (closed, not open: a provider's node must not get traffic it was never
bound for because a read failed); a failed later reading keeps the one before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from sqlalchemy.engine import Engine

from cluster import nodes
from cluster.ray_internals import alive_actor_nodes

logger = logging.getLogger("darkgpu.nodes")
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"


class NodeBindings:
    def __init__(
        self,
        engine: Engine,
        app_prefix: str,
        control_nodes: frozenset[str],
        ttl_s: float = 1.0,
        placements: Callable[[str], Mapping[str, str]] = alive_actor_nodes,
    ) -> None:
        self._engine = engine
        # the replicas of every application whose name starts so (each model is one)
        self._prefix = f"{REPLICA_ACTOR_PREFIX}{app_prefix}"
        self._control = control_nodes
        self._ttl_s = ttl_s
        self._placements = placements
        self._replica_nodes: dict[str, str] = {}  # replica id -> node id
        self._bound: dict[str, str] = {}  # node id -> provider id
        self._read_at = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    def allows(self, replica_id: str, provider_id: str) -> bool:
        node_id = self._replica_nodes.get(replica_id)
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
            self._replica_nodes, self._bound = await asyncio.to_thread(self._read)
        except Exception as exc:  # noqa: BLE001 - keep the last reading
            logger.warning("reading the node bindings failed: %r", exc)
            return
        self._read_at = time.monotonic()

    def _read(self) -> tuple[dict[str, str], dict[str, str]]:
        placed = self._placements(self._prefix)
        replica_nodes = {name.rsplit("#", 1)[-1]: node for name, node in placed.items()}
        return replica_nodes, nodes.bindings(self._engine)


# The ingress installs its bindings here; its replica directory (`serve_app.replica_stats`)
# reads them, so the replicas it lists to the pool are only those bound where they run. The
# request router (`serve_app.router`) applies them too where a process installed them.
_installed: NodeBindings | None = None


def install(bindings: NodeBindings | None) -> None:
    global _installed
    _installed = bindings


async def refresh_installed() -> None:
    if _installed is not None:
        await _installed.refresh()


def permits(replica_id: str, provider_id: object) -> bool:
    """Whether the installed bindings let this replica serve as `provider_id` (a replica that
    named no provider yet: not). Without bindings installed (a process that is not an
    ingress: a test's own handle, the bare benchmark) everything is permitted."""
    if _installed is None:
        return True
    return isinstance(provider_id, str) and _installed.allows(replica_id, provider_id)
