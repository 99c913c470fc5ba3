"""The control plane's calls to a pool that are not generation: what it has, what it must
deploy and what it must drop (`serve_app.pool_protocol`). Blocking, with a timeout each:
they are made from threads (the billing actor's chores and gauges, the supply reconciler, a
route's `asyncio.to_thread`), never on an event loop.

What the pool answers is untrusted input, read up to `MAX_LIST_BYTES`: an answer out of
contract raises (ValueError or httpx's error), so that a caller keeps what it last knew
instead of acting on nothing: a node table read as empty would unbind no one, but would
plan no supply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import httpx

from cluster.nodes import ClusterNode
from cluster.pools import pools
from cluster.supply import ModelSupply
from core.settings import Settings
from kernel.labels import TrustTier
from serve_app.pool_protocol import (
    DRAIN_PATH,
    MAX_LIST_BYTES,
    MODELS_PATH,
    NODES_PATH,
    REPLICAS_PATH,
    PoolListing,
    drain_body,
    models_body,
    parse_nodes,
    parse_replicas,
)

# Deploying a model returns once Serve took it (its replicas start later), but building the
# application may first make a local model's files.
APPLY_TIMEOUT_S = 120.0


class PoolAdmin:
    """One pool's admin calls, over one kept-alive client: a client made per call loads the
    CA bundle into a new SSL context each time (httpx does so even for plain HTTP), which
    was most of the supply reconciler's and the billing actor's idle CPU (py-spy, issue 13).
    httpx's client is safe to share between the threads that call it."""

    def __init__(self, url: str, credential: str, timeout_s: float = 5.0) -> None:
        self._url = url.rstrip("/")
        self._timeout_s = timeout_s
        self._client = httpx.Client(headers={"authorization": f"Bearer {credential}"})

    def replicas(self) -> PoolListing:
        """Every model replica the pool has alive, where it placed each, what each reports."""
        return parse_replicas(self._call("GET", REPLICAS_PATH))

    def nodes(self) -> list[ClusterNode]:
        """The pool's node table."""
        return parse_nodes(self._call("GET", NODES_PATH))

    def drain(self, node_id: str, reason: str) -> bool:
        """Ask the pool to drain a node: whether its GCS accepted."""
        answer = json.loads(self._call("POST", DRAIN_PATH, drain_body(node_id, reason)))
        accepted = answer.get("accepted") if isinstance(answer, dict) else None
        if not isinstance(accepted, bool):
            raise ValueError("the pool answered a drain out of contract")
        return accepted

    def apply_models(self, wanted: Mapping[str, ModelSupply]) -> None:
        """Ask the pool to deploy these models with these bounds, and no other (it deploys
        before it answers, within `APPLY_TIMEOUT_S`)."""
        self._call("PUT", MODELS_PATH, models_body(wanted), timeout_s=APPLY_TIMEOUT_S)

    def _call(
        self, method: str, path: str, body: object = None, timeout_s: float | None = None
    ) -> bytes:
        with self._client.stream(
            method,
            f"{self._url}/{path}",
            json=body,
            timeout=timeout_s or self._timeout_s,
        ) as response:
            if response.status_code != 200:
                raise ValueError(f"the pool's {path}: status {response.status_code}")
            parts, size = [], 0
            for part in response.iter_bytes():
                size += len(part)
                if size > MAX_LIST_BYTES:
                    raise ValueError(f"the pool's {path}: more than {MAX_LIST_BYTES} bytes")
                parts.append(part)
        return b"".join(parts)


def pool_admins(settings: Settings) -> dict[TrustTier, PoolAdmin]:
    """Every trust tier's pool, as the control plane's threads call it."""
    return {tier: PoolAdmin(pool.url, pool.credential()) for tier, pool in pools(settings).items()}
