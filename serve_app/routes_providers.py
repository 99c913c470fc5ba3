"""Provider routes: the public attestation document, an account creating a provider, and the
agent's own endpoints, authenticated with its provider token (`Authorization: Bearer dgpp-…`;
consumer keys are refused there, and provider tokens on consumer routes).

    GET  /v1/providers/{id}/attestation   public
    POST /v1/providers                    consumer key: create a provider, get its token once
    GET  /v1/providers                    consumer key: the account's providers
    POST /v1/providers/auth               provider token: cluster address + Ray token
    POST /v1/providers/challenge          provider token: a fresh attestation challenge
    POST /v1/providers/register           provider token: GPU facts, key, floor, schedule
    POST /v1/providers/heartbeat          provider token: alive, and in which status
    GET  /v1/providers/me                 provider token: state and earnings so far

SQL work runs in FastAPI's thread pool (sync routes) or `asyncio.to_thread`. What the registry
refuses carries its own status and code (`cluster.registry`: 400, 401 for a token, 404, 503
before the cluster has a Ray token) and becomes a response in `serve_app.errors`.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from billing import earnings
from cluster import market, registry
from cluster.attestation import CHALLENGE_MAX_AGE_S
from cluster.attestation_document import attestation_document
from cluster.registry import ProviderInfo, Registration
from core.schema import ProviderReview, ProviderStatus
from kernel.labels import VRAM_RESOURCE, NodeIdentity, TrustTier
from serve_app.gate import bearer_key
from serve_app.services import Services, services

router = APIRouter()
Svc = Annotated[Services, Depends(services)]


class CreateProvider(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="my-gpu", min_length=1, max_length=100)


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["online", "paused", "draining", "offline"]
    reason: str | None = Field(default=None, max_length=200)


def provider_auth(request: Request, svc: Svc) -> ProviderInfo:
    """FastAPI dependency: the provider of the request's provider token."""
    return registry.authenticate(svc.db, bearer_key(request))


AuthedProvider = Annotated[ProviderInfo, Depends(provider_auth)]


def node_spec(provider: ProviderInfo) -> dict[str, Any]:
    """The labels and resources the agent's `ray start` declares."""
    identity = NodeIdentity(
        provider_id=provider.id,
        trust_tier=TrustTier(provider.trust_tier),
        gpu_model=provider.gpu_name.replace(" ", "_") if provider.gpu_name else None,
    )
    resources = {VRAM_RESOURCE: round(provider.vram_gb)} if provider.vram_gb else {}
    return {"labels": identity.labels(), "resources": resources}


@router.get("/v1/providers/{provider_id}/attestation")
def get_attestation(provider_id: str, svc: Svc) -> dict[str, Any]:
    return attestation_document(registry.get_provider(svc.db, provider_id))


@router.post("/v1/providers", status_code=201)
async def create_provider(
    request: Request, svc: Svc, body: CreateProvider | None = None
) -> dict[str, Any]:
    account_id = await svc.gate.account(request)
    name = body.name if body else CreateProvider().name
    new = await asyncio.to_thread(
        registry.create_provider, svc.db, account_id=account_id, name=name
    )
    return {**new.provider.to_json(), "token": new.token}


@router.get("/v1/providers")
async def list_own_providers(request: Request, svc: Svc) -> dict[str, Any]:
    account_id = await svc.gate.account(request)
    rows = await asyncio.to_thread(registry.list_providers, svc.db, account_id=account_id)
    return {"object": "list", "data": [p.to_json() for p in rows]}


@router.post("/v1/providers/auth")
def exchange(provider: AuthedProvider, svc: Svc) -> dict[str, Any]:
    """The address and Ray token of the provider's tier's pool, only for a provider the
    operator approved: any node with the token can join (and Ray trusts every node that
    joins), so each tier's providers get their own pool's, never another's."""
    approved = provider.review == ProviderReview.approved.value
    tier = TrustTier(provider.trust_tier)
    return {
        "object": "provider.credentials",
        "provider_id": provider.id,
        "review": provider.review,
        "trust_tier": tier.value,
        "cluster_address": svc.providers.cluster_address(tier) if approved else None,
        "ray_auth_token": svc.providers.ray_token(tier) if approved else None,
        "heartbeat_interval_s": svc.providers.settings.heartbeat_interval_s,
    }


@router.post("/v1/providers/challenge")
def challenge(provider: AuthedProvider, svc: Svc) -> dict[str, Any]:
    return {
        "object": "provider.challenge",
        "challenge": svc.providers.challenge(provider.id),
        "expires_in_s": CHALLENGE_MAX_AGE_S,
    }


@router.post("/v1/providers/register")
def register(
    body: Registration,
    provider: AuthedProvider,
    svc: Svc,
) -> dict[str, Any]:
    secret = svc.providers.secret() if body.cc_evidence is not None else b""
    done = registry.register(
        svc.db, provider.id, body, secret=secret, verifier=svc.providers.verifier
    )
    return {
        **done.provider.to_json(),
        "tier_reason": done.tier_reason,
        "node": node_spec(done.provider),
        "heartbeat_interval_s": svc.providers.settings.heartbeat_interval_s,
    }


@router.post("/v1/providers/heartbeat")
def heartbeat(
    body: Heartbeat,
    provider: AuthedProvider,
    svc: Svc,
) -> dict[str, Any]:
    updated = registry.heartbeat(svc.db, provider.id, ProviderStatus(body.status))
    return {
        **updated.to_json(),
        "heartbeat_interval_s": svc.providers.settings.heartbeat_interval_s,
    }


@router.get("/v1/providers/me")
def me(provider: AuthedProvider, svc: Svc) -> dict[str, Any]:
    record = market.reputation(svc.db, [provider.id])[provider.id]
    return {**provider.to_json(), "earnings": earnings.totals(svc.db, provider.id).to_json(),
            "reputation": record.to_json()}  # fmt: skip
