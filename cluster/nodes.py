"""Which Ray node serves as which provider: one-time join tickets and the bindings they make.

A node chooses its own labels at `ray start` (`darkgpu.io/provider-id=…`), so a label proves
nothing: any node could claim to be a verified provider, or label itself the control role.
Before it joins, an approved provider's agent asks for a ticket (`POST
/v1/providers/tickets`: one-time, `TICKET_TTL_S`, stored hashed); once joined, it redeems it
with its Ray node id (`POST /v1/providers/nodes`). The platform binds that node id to the
provider when the cluster's own table (the GCS) shows the node alive and labelled as that
provider, and no other provider holds it. The router gives a replica traffic only where its
node, as the GCS placed it, is bound to the provider its stats name
(`serve_app.node_bindings`), and the billing actor drains nodes that claim a provider they
are not bound to, or the control role (`nodes_to_remove`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.schema import JoinTicket, Provider, ProviderNode, ProviderReview, utcnow
from kernel.errors import AuthError, Conflict, Forbidden, InvalidRequest
from kernel.labels import LOCAL_PROVIDER_ID, PROVIDER_ID_LABEL, ROLE_LABEL, TrustTier
from kernel.tokens import hash_key

TICKET_PREFIX = "dgpj-"
TICKET_TTL_S = 900
NODE_ID_HEX_LEN = 56  # a Ray node id: 28 bytes, in hex


class TicketError(AuthError):
    """The ticket is unknown, used, expired or another provider's (one answer for all)."""


class NodeBindingError(Conflict):
    """The node cannot be bound to this provider."""


@dataclass(frozen=True)
class NewTicket:
    ticket: str
    expires_at: datetime


@dataclass(frozen=True)
class ClusterNode:
    """A node as the pool's own table shows it (its GCS): labels and resources as the node
    declared them at `ray start`, whether the GCS is draining it."""

    node_id: str
    alive: bool
    labels: Mapping[str, str]
    resources: Mapping[str, float] = field(default_factory=dict)
    draining: bool = False

    @property
    def claimed_provider(self) -> str | None:
        return self.labels.get(PROVIDER_ID_LABEL)

    @property
    def claims_control(self) -> bool:
        return ROLE_LABEL in self.labels


def cluster_nodes(draining: Collection[str] = ()) -> list[ClusterNode]:
    """Every node of the cluster this process is connected to, from its node table;
    `draining`: the ids the GCS is draining (`cluster.ray_internals.DrainingNodes`)."""
    import ray

    return [
        ClusterNode(
            node_id=str(entry["NodeID"]),
            alive=bool(entry.get("Alive")),
            labels={str(k): str(v) for k, v in (entry.get("Labels") or {}).items()},
            resources={str(k): float(v) for k, v in (entry.get("Resources") or {}).items()},
            draining=str(entry["NodeID"]) in draining,
        )
        for entry in ray.nodes()  # type: ignore[no-untyped-call]  # Ray leaves it unannotated
    ]


def issue_ticket(engine: Engine, provider_id: str, now: datetime | None = None) -> NewTicket:
    """A one-time ticket for an approved provider (a pending or suspended one gets none:
    it may not join)."""
    now = now or utcnow()
    ticket = TICKET_PREFIX + secrets.token_urlsafe(32)
    with Session(engine) as session, session.begin():
        provider = session.get(Provider, provider_id)
        if provider is None or provider.review != ProviderReview.approved.value:
            raise Forbidden(
                "Only an approved provider may join the cluster; this one is "
                f"{provider.review if provider else 'unknown'}.",
                code="provider_not_approved",
            )
        expires_at = now + timedelta(seconds=TICKET_TTL_S)
        session.add(
            JoinTicket(
                ticket_hash=hash_key(ticket), provider_id=provider_id, created_at=now,
                expires_at=expires_at,
            )
        )  # fmt: skip
    return NewTicket(ticket, expires_at)


def check_node_id(node_id: str) -> str:
    node_id = node_id.strip().lower()
    if len(node_id) != NODE_ID_HEX_LEN or any(c not in "0123456789abcdef" for c in node_id):
        raise InvalidRequest("node_id must be a Ray node id (56 hex digits).", param="node_id")
    return node_id


def redeem(
    engine: Engine,
    provider_id: str,
    ticket: str,
    node: ClusterNode | None,
    now: datetime | None = None,
    models: Sequence[str] = (),
) -> None:
    """Bind `node` to `provider_id` with its ticket, and the catalog models the provider lets
    it serve (`models`, most preferred first; empty: any that fits). The ticket is spent only
    by a binding that succeeds (a node not yet in the table may be tried again with it)."""
    now = now or utcnow()
    with Session(engine) as session, session.begin():
        found = session.scalars(
            select(JoinTicket).where(JoinTicket.ticket_hash == hash_key(ticket)).with_for_update()
        ).one_or_none()
        if (
            found is None
            or found.provider_id != provider_id
            or found.used_at is not None
            or found.expires_at <= now
        ):
            raise TicketError("The join ticket is unknown, used, expired or not yours.")
        if node is None or not node.alive:
            raise NodeBindingError(
                "No alive node of the cluster has this id (yet).", code="node_not_found"
            )
        if node.claimed_provider != provider_id:
            raise NodeBindingError(
                "The node is not labelled as your provider.", code="node_label_mismatch"
            )
        if node.claims_control:
            raise NodeBindingError("A provider's node may not claim the control role.",
                                   code="node_label_mismatch")  # fmt: skip
        bound = session.get(ProviderNode, node.node_id, with_for_update=True)
        if bound is not None and bound.provider_id != provider_id:
            raise NodeBindingError("The node is bound to another provider.", code="node_taken")
        allowed_models = json.dumps(list(dict.fromkeys(models)))  # in its order of preference
        if bound is None:
            session.add(ProviderNode(node_id=node.node_id, provider_id=provider_id, bound_at=now,
                                     models=allowed_models))  # fmt: skip
        else:
            bound.models = allowed_models
        found.used_at, found.node_id = now, node.node_id


def bindings(engine: Engine) -> dict[str, str]:
    """node id -> the provider bound to it."""
    with Session(engine) as session:
        return dict(session.execute(select(ProviderNode.node_id, ProviderNode.provider_id)).all())


def allow_lists(engine: Engine) -> dict[str, tuple[str, ...]]:
    """node id -> the models its provider lets it serve, most preferred first (empty: any
    that fits)."""
    with Session(engine) as session:
        rows = session.execute(select(ProviderNode.node_id, ProviderNode.models)).all()
    return {node_id: tuple(json.loads(models or "[]")) for node_id, models in rows}


def provider_tiers(engine: Engine) -> dict[str, TrustTier]:
    """provider id -> its trust tier, as the registry has it."""
    with Session(engine) as session:
        rows = session.execute(select(Provider.id, Provider.trust_tier)).all()
    return {provider_id: TrustTier(tier) for provider_id, tier in rows}


def approved_providers(engine: Engine) -> set[str]:
    with Session(engine) as session:
        approved = select(Provider.id).where(Provider.review == ProviderReview.approved.value)
        return set(session.scalars(approved))


def allowed(
    provider_id: str,
    node_id: str | None,
    bound: Mapping[str, str],
    control_nodes: Iterable[str],
) -> bool:
    """Whether a replica that names `provider_id` and that the cluster placed on `node_id`
    may get traffic: the platform's own (`local`) replicas on a control node, a provider's
    on a node bound to it."""
    if node_id is None:
        return False
    if provider_id == LOCAL_PROVIDER_ID:
        return node_id in set(control_nodes)
    return bound.get(node_id) == provider_id


def nodes_to_remove(
    nodes: Iterable[ClusterNode],
    bound: Mapping[str, str],
    control_nodes: Iterable[str],
    first_seen_s: Mapping[str, float],
    now_s: float,
    grace_s: float,
    approved: Collection[str] | None = None,
    tiers: Mapping[str, TrustTier] | None = None,
    pool: TrustTier | None = None,
) -> dict[str, str]:
    """node id -> why it must leave: a node that claims the control role and is not one; one
    that claims a provider it is not bound to (after `grace_s` to redeem its ticket); one
    bound to a provider but labelled as another; one whose provider is no longer approved
    (suspended or revoked: its agent drains it, and a patched agent is drained anyway); in
    the `pool` of one trust tier, one whose provider is of another (`tiers`: its tier changed
    since it joined; it rejoins its tier's pool)."""
    control = set(control_nodes)
    out = {}
    for node in nodes:
        if not node.alive or node.node_id in control:
            continue
        claimed, owner = node.claimed_provider, bound.get(node.node_id)
        of_pool_tier = pool is None or tiers is None or tiers.get(owner or "") is pool
        if node.claims_control:
            out[node.node_id] = "it claims the control role"
        elif owner is not None and claimed != owner:
            out[node.node_id] = f"it is bound to {owner} but labelled {claimed}"
        elif owner is not None and approved is not None and owner not in approved:
            out[node.node_id] = f"its provider {owner} is not approved"
        elif owner is not None and not of_pool_tier:
            out[node.node_id] = f"its provider {owner} is not of the {pool} tier"
        elif owner is None and now_s - first_seen_s.get(node.node_id, now_s) > grace_s:
            out[node.node_id] = "it never redeemed a join ticket for its labels"
    return out
