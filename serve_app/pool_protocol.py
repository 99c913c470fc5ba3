"""The hop between the control plane's ingress and a supply pool's gateway, as HTTP.

DESIGN's two planes: the ingress (control plane: keys, money, secrets) reaches the model
deployments only through their pool's Serve application, over HTTP, with the pool's
credential. This module is the contract both sides share; `serve_app.pool` is the gateway,
`serve_app.pool_client` the ingress's side.

A generation call: `POST <pool>/chat` or `/completions`, `Authorization: Bearer <credential>`,
the catalog model in `x-darkgpu-model`, the body the engine's request as JSON (the ingress
validated it and set the limits it reserved), and what the request router may use in the
router's own headers (`serve_app.router.Allowed`: `x-darkgpu-replicas`, …).

The answer: once a replica took the request and the engine's first item came, status 200 with
the replica's provider in `x-darkgpu-served-by` (JSON: `ServedBy`), and as body the whole
answer (JSON) or the stream's server-sent events as the engine wrote them. An error the engine
gave before anything was produced: its own status and `{"error": {...}}`, with
`x-darkgpu-engine-error: 1`. The gateway's own refusals (credential 401, unknown model 404, no
replica or back-pressure 503) carry no such header.

The pool's replicas: `GET <pool>/replicas`, with the same credential: every model replica the
pool's GCS has alive, with the node it placed it on (the actor table's, not the replica's
word) and the routing stats the replica reports (its own word: its provider, load, whether its
node drains), as `{"replicas": [{"model", "replica_id", "node_id", "stats"}, ...]}`. The
ingress reads it about once a second (`serve_app.replica_stats`), keeps a replica only where the
control plane bound its node to the provider its stats name, and takes tier and price from the
registry, never from the stats.

The credential's SHA-256 is all the gateway holds: the pool's cluster is readable by every
node in it, so the credential it could leak there would let anyone who reaches the pool's
port call the models as the ingress; it cannot be recovered from the digest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

ENDPOINTS = frozenset({"chat", "completions"})
MODEL_HEADER = "x-darkgpu-model"
SERVED_BY_HEADER = "x-darkgpu-served-by"
ENGINE_ERROR_HEADER = "x-darkgpu-engine-error"
REPLICAS_PATH = "replicas"
MAX_REPLICAS_BYTES = 4 * 1024 * 1024
MAX_ID_CHARS = 128
logger = logging.getLogger("darkgpu.pool")


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


def replicas_body(replicas: list[PoolReplica]) -> bytes:
    return json.dumps({"replicas": [r.json() for r in replicas]}, default=str).encode()


def parse_replicas(raw: bytes) -> list[PoolReplica]:
    """The pool's list, parsed as untrusted input: ValueError when it is not a list at all;
    an entry that is malformed is left out (logged), and costs only its replica."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("a replica list that is not JSON") from None
    entries = body.get("replicas") if isinstance(body, dict) else None
    if not isinstance(entries, list):
        raise ValueError("a replica list that is not one")
    out = []
    for entry in entries:
        replica = _replica(entry)
        if replica is None:
            logger.warning("the pool listed a malformed replica: %.200r", entry)
        else:
            out.append(replica)
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
