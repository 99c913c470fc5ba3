"""A provider binds its Ray node to itself (`cluster.nodes`), with its provider token:

    POST /v1/providers/tickets   a one-time join ticket (approved providers only)
    POST /v1/providers/nodes     {"ticket", "node_id", "models"}: bind that node, as the
                                 cluster sees it, to serve those catalog models (none: any
                                 that fits; `models = [...]` in the agent's provider.toml)

The node's labels are read from the node table of the provider's tier's pool (its gateway
lists it: `serve_app.pool_admin`), never from the request: a node in another pool is not
found there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from cluster import nodes
from kernel.errors import InvalidRequest
from kernel.labels import TrustTier
from serve_app.catalog_file import catalog_of
from serve_app.routes_providers import AuthedProvider, Svc

router = APIRouter()


class BindNode(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ticket: str = Field(min_length=1, max_length=200)
    node_id: str = Field(min_length=1, max_length=100)
    models: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list, max_length=64
    )


@router.post("/v1/providers/tickets", status_code=201)
def issue_ticket(provider: AuthedProvider, svc: Svc) -> dict[str, Any]:
    new = nodes.issue_ticket(svc.db, provider.id)
    return {
        "object": "provider.join_ticket",
        "ticket": new.ticket,
        "expires_at": new.expires_at.isoformat(),
    }


def node_table(provider: AuthedProvider, svc: Svc) -> Callable[[], list[nodes.ClusterNode]]:
    """How the node table of the provider's tier's pool is read: from its gateway."""
    pool = svc.pools.get(TrustTier(provider.trust_tier))
    return pool.nodes if pool is not None else list  # no pool for its tier: no node


NodeTable = Annotated[Callable[[], list[nodes.ClusterNode]], Depends(node_table)]


@router.post("/v1/providers/nodes", status_code=201)
async def bind_node(
    body: BindNode, provider: AuthedProvider, svc: Svc, table: NodeTable
) -> dict[str, Any]:
    node_id = nodes.check_node_id(body.node_id)
    unknown = sorted(set(body.models) - set(catalog_of(svc).by_id))
    if unknown:
        raise InvalidRequest(
            f"Not catalog models: {', '.join(unknown)} (see GET /v1/models).", param="models"
        )
    found = await asyncio.to_thread(find_node, table, node_id)
    await asyncio.to_thread(
        nodes.redeem, svc.db, provider.id, body.ticket, found, models=body.models
    )
    return {"object": "provider.node", "provider_id": provider.id, "node_id": node_id,
            "models": list(dict.fromkeys(body.models))}  # fmt: skip


def find_node(
    table: Callable[[], list[nodes.ClusterNode]], node_id: str
) -> nodes.ClusterNode | None:
    return next((node for node in table() if node.node_id == node_id), None)
