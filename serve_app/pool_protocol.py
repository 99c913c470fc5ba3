"""The hop between the control plane's ingress and a supply pool's gateway, as HTTP.

DESIGN's two planes: the ingress (control plane: keys, money, secrets) reaches the model
deployments only through their pool's Serve application, over HTTP, with the pool's
credential. This module is the contract both sides share; `serve_app.pool` is the gateway,
`serve_app.pool_client` the ingress's side.

A generation call: `POST <pool>/chat` or `/completions`, `Authorization: Bearer <credential>`,
the catalog model in `x-darkgpu-model`, the body the engine's request as JSON (the ingress
validated it and set the limits it reserved), and what the request router may use in the
router's own headers (`serve_app.router.Allowed`: `x-darkgpu-replicas`, …).

How long a replica may take to take the request: `x-darkgpu-take-within` (seconds, at most
`MAX_TAKE_WITHIN_S`; `TAKE_WITHIN_S` when absent). A replica takes a request when it starts
on it (the first thing it yields says who it is); one that none of the listed replicas took
in time (gone, or full) is given back: 503 with `x-darkgpu-not-taken: 1`, and the ingress
routes it again on a fresh reading. From then on the gateway waits for the engine's first
item (the whole answer of a request that does not stream, the first event of one that does)
at most `x-darkgpu-answer-within` seconds, if the ingress gives it (above 0, at most
`MAX_ANSWER_WITHIN_S`; the ingress sizes it by what it asked for: a long answer is not a
stalled one). A replica that took the request and then gave nothing in that time stalled,
whatever it is doing (a provider's engine is the provider's): the gateway cancels it and
answers 503 with `x-darkgpu-stalled: 1` and who took it (`x-darkgpu-served-by`); the ingress
routes the request again, without that replica.

The answer: once a replica took the request and the engine's first item came, status 200 with
the replica's provider in `x-darkgpu-served-by` (JSON: `ServedBy`), and as body the whole
answer (JSON) or the stream's server-sent events as the engine wrote them. An error the engine
gave before anything was produced: its own status and `{"error": {...}}`, with
`x-darkgpu-engine-error: 1`. The gateway's own refusals (credential 401, unknown model 404, no
replica or back-pressure 503) carry no such header.

The pool's replicas: `GET <pool>/replicas`, with the same credential: every model replica the
pool's GCS has alive, with the node it placed it on (the actor table's, not the replica's
word) and the routing stats the replica reports (its own word: its provider, load, whether its
node drains), and the models that have a replica Serve routes to now (its controller's word),
as `{"replicas": [{"model", "replica_id", "node_id", "stats"}, ...], "online": [ids]}`. The
ingress reads it about once a second (`serve_app.replica_stats`), keeps a replica only where the
control plane bound its node to the provider its stats name, and takes tier and price from the
registry, never from the stats.

The pool's nodes: `GET <pool>/nodes`: every node of the pool's GCS table, alive or not, with
the labels and resources it declared at `ray start` and whether the GCS drains it, as `{"nodes":
[{"node_id", "alive", "labels", "resources", "draining"}, ...]}`. The control plane binds a
provider's node by it (`cluster.nodes.redeem`), plans the supply on it and finds the nodes that
have no right to be there (`cluster.node_warden`), which it asks the pool to drain: `POST
<pool>/drain` with `{"node_id", "reason"}`, answered `{"accepted": bool}`.

The supply plan: `PUT <pool>/models` with `{"models": {"<catalog id>": {"min_replicas",
"max_replicas"}, ...}}`, the whole set the control plane's reconciler wants deployed now
(`serve_app.pool_models` makes Serve match it), answered `{"models": [ids]}`.

The credential's SHA-256 is all the gateway holds: the pool's cluster is readable by every
node in it, so the credential it could leak there would let anyone who reaches the pool's
port call the models as the ingress; it cannot be recovered from the digest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeGuard, TypeVar

from cluster.nodes import ClusterNode
from cluster.supply import ModelSupply
from kernel.errors import InvalidRequest

ENDPOINTS = frozenset({"chat", "completions"})
MODEL_HEADER = "x-darkgpu-model"
SERVED_BY_HEADER = "x-darkgpu-served-by"
ENGINE_ERROR_HEADER = "x-darkgpu-engine-error"
TAKE_WITHIN_HEADER = "x-darkgpu-take-within"
NOT_TAKEN_HEADER = "x-darkgpu-not-taken"
TAKE_WITHIN_S = 3.0
MAX_TAKE_WITHIN_S = 60.0
ANSWER_WITHIN_HEADER = "x-darkgpu-answer-within"
STALLED_HEADER = "x-darkgpu-stalled"
MAX_ANSWER_WITHIN_S = 86_400.0
REPLICAS_PATH = "replicas"
NODES_PATH = "nodes"
DRAIN_PATH = "drain"
MODELS_PATH = "models"
MAX_MODEL_REPLICAS = 1024
MAX_LIST_BYTES = 4 * 1024 * 1024  # a list of replicas or nodes
MAX_ID_CHARS = 128
MAX_LABELS = 64
MAX_LABEL_CHARS = 256
MAX_RESOURCES = 256
MAX_REASON_CHARS = 200
NODE_ID_HEX = 56  # a Ray node id: 28 bytes, in hex
logger = logging.getLogger("darkgpu.pool")
T = TypeVar("T")


@dataclass(frozen=True)
class ServedBy:
    """Which replica took a request: the first item of every model replica's answer stream,
    and the gateway's `x-darkgpu-served-by` header."""

    provider_id: str
    trust_tier: str
    replica: str
    price_floor_pct: int = 0

    def header(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_header(cls, value: str | None) -> ServedBy:
        """Parsed as untrusted input (it comes from the pool): ValueError when malformed."""
        try:
            raw = json.loads(value or "")
        except json.JSONDecodeError:
            raise ValueError("malformed served-by header") from None
        if not isinstance(raw, dict):
            raise ValueError("malformed served-by header")
        provider, tier, replica = (raw.get(k) for k in ("provider_id", "trust_tier", "replica"))
        floor = raw.get("price_floor_pct", 0)
        if not all(isinstance(v, str) for v in (provider, tier, replica)) or not (
            isinstance(floor, int) and not isinstance(floor, bool)
        ):
            raise ValueError("malformed served-by header")
        return cls(provider, tier, replica, floor)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PoolReplica:
    """One model replica as the pool lists it (`GET <pool>/replicas`)."""

    model: str  # the catalog model id
    replica_id: str  # Serve's unique id of the replica (what the router's headers list)
    node_id: str  # where the pool's GCS placed it
    stats: Mapping[str, Any]  # what the replica reports of itself: untrusted

    def json(self) -> dict[str, Any]:
        return {**asdict(self), "stats": dict(self.stats)}


@dataclass(frozen=True)
class PoolListing:
    """The pool's answer to `GET <pool>/replicas`."""

    replicas: list[PoolReplica]
    # the models with a replica Serve routes to now (its controller's word, pushed to the
    # gateway: `serve_app.availability`)
    online: frozenset[str] = frozenset()


def replicas_body(replicas: list[PoolReplica], online: Collection[str] = ()) -> bytes:
    body = {"replicas": [r.json() for r in replicas], "online": sorted(online)}
    return json.dumps(body, default=str).encode()


def parse_replicas(raw: bytes) -> PoolListing:
    """The pool's replicas, parsed as untrusted input: ValueError when it is not a listing
    at all; an entry that is malformed is left out (logged), and costs only its replica."""
    body = _json_object(raw, "replicas")
    online = body.get("online")
    if not isinstance(online, list) or not all(
        isinstance(m, str) and 0 < len(m) <= MAX_ID_CHARS for m in online
    ):
        raise ValueError("a list of online models that is not one")
    return PoolListing(_parse_list(body, "replicas", _replica), frozenset(online))


def nodes_body(nodes: list[ClusterNode]) -> bytes:
    listed = [{**asdict(n), "labels": dict(n.labels), "resources": dict(n.resources)}
              for n in nodes]  # fmt: skip
    return json.dumps({"nodes": listed}).encode()


def parse_nodes(raw: bytes) -> list[ClusterNode]:
    """The pool's node table, parsed as untrusted input, as `parse_replicas`."""
    return _parse_list(_json_object(raw, "nodes"), "nodes", _node)


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"a list of {what} that is not JSON") from None
    if not isinstance(body, dict):
        raise ValueError(f"a list of {what} that is not one")
    return body


def _parse_list(body: dict[str, Any], key: str, parse: Callable[[Any], T | None]) -> list[T]:
    entries = body.get(key)
    if not isinstance(entries, list):
        raise ValueError(f"a list of {key} that is not one")
    out = []
    for entry in entries:
        found = parse(entry)
        if found is None:
            logger.warning("the pool listed one of its %s malformed: %.200r", key, entry)
        else:
            out.append(found)
    return out


def _replica(entry: Any) -> PoolReplica | None:
    if not isinstance(entry, dict):
        return None
    model, replica_id, node_id = (entry.get(k) for k in ("model", "replica_id", "node_id"))
    stats = entry.get("stats")
    for value in (model, replica_id, node_id):
        if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
            return None
    if not isinstance(stats, dict):
        return None
    return PoolReplica(model, replica_id, node_id, stats)  # type: ignore[arg-type]


def is_node_id(value: Any) -> TypeGuard[str]:
    return (
        isinstance(value, str)
        and len(value) == NODE_ID_HEX
        and all(c in "0123456789abcdef" for c in value)
    )


def _node(entry: Any) -> ClusterNode | None:
    if not isinstance(entry, dict):
        return None
    node_id, labels, resources = entry.get("node_id"), entry.get("labels"), entry.get("resources")
    alive, draining = entry.get("alive"), entry.get("draining")
    if not is_node_id(node_id) or not isinstance(alive, bool) or not isinstance(draining, bool):
        return None
    if (
        not isinstance(labels, dict)
        or len(labels) > MAX_LABELS
        or not all(
            isinstance(v, str) and 0 < len(k) <= MAX_LABEL_CHARS and len(v) <= MAX_LABEL_CHARS
            for k, v in labels.items()
        )
    ):
        return None
    if (
        not isinstance(resources, dict)
        or len(resources) > MAX_RESOURCES
        or not all(
            0 < len(k) <= MAX_LABEL_CHARS
            and isinstance(v, int | float)
            and not isinstance(v, bool)
            and math.isfinite(v)
            and v >= 0
            for k, v in resources.items()
        )
    ):
        return None
    return ClusterNode(
        node_id, alive, labels, {k: float(v) for k, v in resources.items()}, draining
    )


def drain_body(node_id: str, reason: str) -> dict[str, str]:
    return {"node_id": node_id, "reason": reason}


def parse_drain(raw: bytes) -> tuple[str, str]:
    """A drain request (`POST <pool>/drain`): the node's id and why. InvalidRequest when
    malformed."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    node_id = body.get("node_id") if isinstance(body, dict) else None
    reason = body.get("reason") if isinstance(body, dict) else None
    if not is_node_id(node_id):
        raise InvalidRequest("node_id must be a Ray node id (56 hex digits).", param="node_id")
    if not isinstance(reason, str) or not 0 < len(reason) <= MAX_REASON_CHARS:
        raise InvalidRequest(f"reason must be 1 to {MAX_REASON_CHARS} characters.", param="reason")
    return node_id, reason


def models_body(wanted: Mapping[str, ModelSupply]) -> dict[str, Any]:
    return {"models": {model: supply.to_json() for model, supply in wanted.items()}}


def parse_models(raw: bytes, catalog_ids: Collection[str]) -> dict[str, ModelSupply]:
    """A supply plan (`PUT <pool>/models`): catalog models only, each with
    0 <= min_replicas <= max_replicas, 0 < max_replicas <= MAX_MODEL_REPLICAS. InvalidRequest
    when malformed (nothing of it is applied)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    models = body.get("models") if isinstance(body, dict) else None
    if not isinstance(models, dict):
        raise InvalidRequest("models must be an object: model id -> bounds.", param="models")
    out = {}
    for model, bounds in models.items():
        if model not in catalog_ids:
            raise InvalidRequest(f"Not a catalog model: {model[:100]!r}.", param="models")
        low = bounds.get("min_replicas") if isinstance(bounds, dict) else None
        high = bounds.get("max_replicas") if isinstance(bounds, dict) else None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) or not (
            0 <= low <= high and 0 < high <= MAX_MODEL_REPLICAS  # type: ignore[operator]
        ):
            raise InvalidRequest(
                f"{model}: 0 <= min_replicas <= max_replicas, "
                f"0 < max_replicas <= {MAX_MODEL_REPLICAS}.",
                param="models",
            )
        out[model] = ModelSupply(low, high)  # type: ignore[arg-type]
    return out


def parse_take_within(value: str | None) -> float:
    """The seconds a replica has to take a request (`TAKE_WITHIN_HEADER`)."""
    if value is None:
        return TAKE_WITHIN_S
    return _seconds(value, TAKE_WITHIN_HEADER, MAX_TAKE_WITHIN_S)


def parse_answer_within(value: str | None) -> float | None:
    """The seconds a replica that took a request has to give its engine's first item
    (`ANSWER_WITHIN_HEADER`); None: no bound but the connection's."""
    if value is None:
        return None
    return _seconds(value, ANSWER_WITHIN_HEADER, MAX_ANSWER_WITHIN_S)


def _seconds(value: str, header: str, most: float) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= most:  # NaN too
        raise InvalidRequest(f"{header} must be a number of seconds above 0, at most {most:g}.")
    return seconds


def credential_digest(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


def credential_matches(authorization: str | None, digest: str) -> bool:
    """Whether an `Authorization: Bearer …` header presents the credential of `digest`
    (compared in constant time)."""
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented or not digest:
        return False
    return hmac.compare_digest(credential_digest(presented.strip()), digest)


def split_events(buffer: str) -> tuple[str, str]:
    """Whole server-sent events at the start of `buffer` (each ends with a blank line), and
    the rest, an event not yet whole: HTTP may cut a stream anywhere."""
    end = buffer.rfind("\n\n")
    if end < 0:
        return "", buffer
    return buffer[: end + 2], buffer[end + 2 :]


def engine_error_body(raw: Any) -> dict[str, Any]:
    """An engine's error object (`ErrorResponse.error`, dumped) as the `{"error": …}` body."""
    return {"error": raw if isinstance(raw, dict) else {"message": str(raw)}}
