"""The billing actor's chore that removes nodes with no right to be in a pool
(`cluster.nodes.nodes_to_remove`), one warden per pool: one that claims the control role, one
labelled as a provider it is not bound to once `grace_s` has passed for it to redeem its join
ticket, one whose provider the operator suspended or revoked, one whose provider is not of the
pool's trust tier. Each is asked to drain once
(`list_nodes` and `drain`: the pool's gateway, `serve_app.pool_admin`; Serve moves its
replicas away and schedules nothing new there); the router already gives such a node no
traffic (`serve_app.replica_stats`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy.engine import Engine

from cluster import nodes
from kernel.labels import TrustTier

logger = logging.getLogger("darkgpu.nodes")


class NodeWarden:
    def __init__(
        self,
        engine: Engine,
        control_nodes: frozenset[str],
        list_nodes: Callable[[], list[nodes.ClusterNode]],
        drain: Callable[[str, str], bool],
        grace_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        pool: TrustTier | None = None,
    ) -> None:
        self._engine = engine
        self._control = control_nodes
        self._grace_s = grace_s
        self._drain = drain
        self._list_nodes = list_nodes
        self._clock = clock
        self._pool = pool
        self._first_seen: dict[str, float] = {}
        self.removed: dict[str, str] = {}  # node id -> why

    def tick(self) -> None:
        try:
            self._tick()
        except Exception as exc:  # noqa: BLE001 - the GCS or SQL away: the next reap tries again
            logger.warning("checking the cluster's nodes failed: %r", exc)

    def _tick(self) -> None:
        now = self._clock()
        found = self._list_nodes()
        for node in found:
            self._first_seen.setdefault(node.node_id, now)
        bound = nodes.bindings(self._engine)
        approved = nodes.approved_providers(self._engine)
        tiers = nodes.provider_tiers(self._engine) if self._pool is not None else None
        verdicts = nodes.nodes_to_remove(
            found, bound, self._control, self._first_seen, now, self._grace_s, approved,
            tiers, self._pool,
        )  # fmt: skip
        for node_id, why in verdicts.items():
            if self.removed.get(node_id) == why:
                continue  # asked once for this reason
            logger.warning("removing node %s from the cluster: %s", node_id, why)
            if self._drain(node_id, f"darkgpu: {why}"):
                self.removed[node_id] = why
