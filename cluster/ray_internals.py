"""Every use of Ray's private modules, in one place: each is an upgrade hazard.

Read from Ray 2.60.0 (`ray[serve]==2.60.0` in pyproject.toml). When Ray is upgraded, check
each name below against the new release first; nothing else in the project imports
`ray._*` or `ray.llm._internal` (ruff's banned-api rule, `make lint`, enforces it).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from pathlib import Path

# The GCS's actor table (where each actor was placed) and its drain request: the node
# bindings (`cluster.nodes`) need where the cluster put a replica, not where the replica says
# it is. `ray.util.state` answers only through the dashboard; no other public API in 2.60.
from ray._common.utils import get_ray_address_file
from ray._private import state as _state
from ray._raylet import GcsClient  # type: ignore[attr-defined]  # compiled; not in its stub
from ray.core.generated import autoscaler_pb2

# The class the LLM engine yields for an error. `ray.serve.llm.openai_api_models` exports an
# `ErrorResponse` too, but it is a subclass that the engine never yields, so `isinstance` on it
# misses every engine error.
from ray.llm._internal.serve.core.configs.openai_api_models import ErrorResponse

# The second argument of `LLMServer.chat/completions`: the HTTP headers a call carries to the
# request router (`PendingRequest.args`). The ingress passes the providers a request may use
# through it. Ray exports no public name for it in 2.60.
from ray.llm._internal.serve.core.protocol import RawRequestInfo

# Serve's controller pushes each deployment's running replicas over its long poll, under the
# key every `DeploymentHandle`'s router subscribes to; `serve_app.availability` listens to the
# same key instead of polling `serve.status()` (issue 13). No public API for it in 2.60.
from ray.serve._private.common import DeploymentID, DeploymentTargetInfo
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray.serve._private.long_poll import LongPollClient, LongPollNamespace
from ray.serve.deployment import Application

__all__ = ["ErrorResponse", "RawRequestInfo", "DrainingNodes", "ray_address_file",
           "DeploymentID", "DeploymentTargetInfo", "LongPollClient", "LongPollNamespace",
           "SERVE_CONTROLLER_NAME", "SERVE_NAMESPACE", "alive_actor_nodes",
           "actor_states", "drain_node", "with_code_version",
           "SERVE_REPLICA_ACTOR_PREFIX"]  # fmt: skip

# Serve names each replica's actor `<this><app>#<deployment>#<replica id>` (ReplicaID's
# `to_full_id_str`)
SERVE_REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"


class DrainingNodes:
    """Which nodes the cluster is draining, read from the GCS the way Serve's own controller
    reads them (`GcsClient.get_draining_nodes`; no public API in 2.60)."""

    def __init__(self, gcs_address: str) -> None:
        self._gcs = GcsClient(address=gcs_address)

    def node_ids(self, timeout_s: float = 2) -> Collection[str]:
        """Blocking: call it from a thread."""
        draining: Collection[str] = self._gcs.get_draining_nodes(timeout=timeout_s)
        return draining


def ray_address_file() -> Path:
    """Ray's note of this machine's current cluster (`ray_current_cluster`), which a plain
    `ray.init()` connects to and `ray stop` removes."""
    return Path(get_ray_address_file(None))


def actor_states(name_prefix: str) -> dict[str, str]:
    """Named actors whose name starts with `name_prefix` -> their state in the GCS actor table
    (`PENDING_CREATION`: waiting for a node with the resources; `ALIVE`: placed and running,
    its constructor included; `DEAD`, ...). Blocking: call it from a process connected to
    the cluster."""
    table = _state.state.actor_table(None)
    return {
        str(info["Name"]): str(info["State"])
        for info in table.values()
        if str(info.get("Name", "")).startswith(name_prefix)
    }


def alive_actor_nodes(name_prefix: str) -> dict[str, str]:
    """Alive named actors whose name starts with `name_prefix` -> the node id the GCS placed
    each on (its actor table; `ray.util.state.list_actors` would answer the same through the
    dashboard's HTTP server, which a cluster may run without). Blocking: call it from a
    thread of a process connected to the cluster."""
    table = _state.state.actor_table(None, actor_state_name="ALIVE")
    return {
        info["Name"]: info["Address"]["NodeID"]
        for info in table.values()
        if str(info.get("Name", "")).startswith(name_prefix)
    }


def drain_node(gcs_address: str, node_id: str, message: str, deadline_s: int) -> bool:
    """Ask the GCS to drain a node (preemption with a deadline, as `ray drain-node` does):
    Serve moves its replicas away and schedules nothing new there. Whether it was accepted."""
    deadline_ms = time.time_ns() // 1_000_000 + deadline_s * 1000
    accepted, _ = GcsClient(address=gcs_address).drain_node(
        node_id,
        autoscaler_pb2.DrainNodeReason.Value(  # type: ignore[attr-defined]  # generated
            "DRAIN_NODE_REASON_PREEMPTION"
        ),
        message,
        deadline_ms,
    )
    return bool(accepted)


def with_code_version(app: Application, version: str) -> Application:
    """`app` with its deployment's code version set. Serve gives a deployment deployed
    without one a random version on every deploy, and restarts its replicas for it; with the
    same version, a deploy that changes only its autoscaling bounds is a light update (no
    replica restarted). 2.60 removed `version` from `@serve.deployment` and `.options()`,
    and kept it on the `Deployment` (`_version`) that `serve.run` sends."""
    app._bound_deployment._version = version
    return app
