"""A provider binds its Ray node to itself (`cluster.nodes`), with its provider token:

    POST /v1/providers/tickets   a one-time join ticket (approved providers only)
    POST /v1/providers/nodes     {"ticket", "node_id"}: bind that node, as the cluster sees it

The node's labels are read from the cluster's own node table, never from the request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from cluster import nodes
from serve_app.routes_providers import AuthedProvider, Svc

router = APIRouter()


class BindNode(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ticket: str = Field(min_length=1, max_length=200)
    node_id: str = Field(min_length=1, max_length=100)


@router.post("/v1/providers/tickets", status_code=201)
def issue_ticket(provider: AuthedProvider, svc: Svc) -> dict[str, Any]:
    new = nodes.issue_ticket(svc.db, provider.id)
    return {
        "object": "provider.join_ticket",
        "ticket": new.ticket,
        "expires_at": new.expires_at.isoformat(),
    }


@router.post("/v1/providers/nodes", status_code=201)
async def bind_node(body: BindNode, provider: AuthedProvider, svc: Svc) -> dict[str, Any]:
    node_id = nodes.check_node_id(body.node_id)
    found = await asyncio.to_thread(cluster_node, node_id)
    await asyncio.to_thread(nodes.redeem, svc.db, provider.id, body.ticket, found)
    return {"object": "provider.node", "provider_id": provider.id, "node_id": node_id}


def cluster_node(node_id: str) -> nodes.ClusterNode | None:
    """The node as the cluster's node table shows it (this process is one of its workers)."""
    for node in nodes.cluster_nodes():
        if node.node_id == node_id:
            return node
    return None
