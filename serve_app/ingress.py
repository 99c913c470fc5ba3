"""The ingress deployment: the OpenAI-compatible HTTP API in front of the model deployments.

Routes are thin. A generation request is parsed and checked (`schemas`), admitted against
the key, rate limit, daily caps and credits (`gate`, one Redis round trip), sent through its
model's handle (the replica is chosen in that handle: `router`), relayed as JSON or
server-sent events (`streaming`), and settled with the usage the engine reported. Each
answer names the provider whose replica served it (`x-darkgpu-provider`); every response
names the request (`x-darkgpu-request-id`, `middleware`).

Routing among providers: before admission the ingress reads which replicas of the model are
up and on which provider's node (`replica_stats`, published by the replicas), takes each
provider's trust tier, price floor and status from the provider registry (not from the
node's own labels), and ranks them against the request's `"provider"` object, or the
account's default tier (`account_tiers`), with `provider_policy`. No candidate: 503
`service_unavailable` with the reason, nothing reserved. Otherwise the reservation is made
at the highest price a candidate bills, the allowed replicas and providers travel to the
request router in the call's `RawRequestInfo` headers (`router`), and settlement bills at
the registry's price of the provider that served. A request with no `"provider"` object and
no account default, where every known replica is at the catalog price and none is
draining, is routed without restriction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.llm._internal.serve.core.configs.openai_api_models import (  # the engine's own class
    ErrorResponse,  # (ray.serve.llm's public ErrorResponse is a subclass the engine never yields)
)
from ray.llm._internal.serve.core.protocol import RawRequestInfo
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from billing.admission import Admitted, connect
from billing.reports import credits_summary, usage_report
from cluster.catalog import Catalog, CatalogModel
from cluster.labels import CONTROL_SELECTOR
from cluster.registry import provider_terms
from serve_app import console, routes_payments, routes_providers
from serve_app.account_tiers import AccountTiers
from serve_app.availability import ReplicaAvailability
from serve_app.errors import (
    APIError,
    install_error_handlers,
    invalid_request,
    model_not_found,
    no_replica,
)
from serve_app.gate import bearer_key
from serve_app.metrics import IngressMetrics
from serve_app.middleware import RequestIdMiddleware
from serve_app.models import ServedBy
from serve_app.provider_policy import (
    NoCandidate,
    Price,
    Ranked,
    Requirements,
    fitting_providers,
    no_candidate_error,
    parse_requirements,
    provider_price,
    rank,
)
from serve_app.replica_stats import RegistryTerms, ReplicaDirectory
from serve_app.router import Allowed
from serve_app.schemas import decode_json, parse_chat, parse_completion, require_model
from serve_app.services import Services
from serve_app.streaming import SSERelay, Usage
from serve_app.tokens import PromptCounter

PROVIDER_HEADER = "x-darkgpu-provider"
RETRY_AFTER_S = 10
# A restricted request whose allowed replicas went away (or whose new replica the ingress had
# not seen yet) waits this long for a replica, then is routed again on a fresh reading.
ROUTE_ATTEMPT_S = 3.0
ROUTE_ATTEMPTS = 10
NO_PROVIDER = ""
logger = logging.getLogger("darkgpu.ingress")

api = FastAPI(title="DarkGPU", docs_url=None, redoc_url=None, openapi_url=None)
api.add_middleware(RequestIdMiddleware)
install_error_handlers(api)
api.include_router(routes_providers.router)
api.include_router(routes_payments.router)
api.include_router(console.router)  # the web console, /console


def model_card(model: CatalogModel, available: bool, created: int) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": created,
        "owned_by": "darkgpu",
        "class": model.model_class.value,
        "context_length": model.context_length,
        "quantization": model.quantization,
        "min_vram_gb": model.min_vram_gb,
        "pricing": {
            "input_usd_per_1m": str(model.input_usd_per_1m),
            "output_usd_per_1m": str(model.output_usd_per_1m),
            "input_nusd_per_token": model.input_nusd_per_token,
            "output_nusd_per_token": model.output_nusd_per_token,
        },
        "available": available,
    }


def engine_error(error: ErrorResponse) -> APIError:
    status = error.error.code if 400 <= int(error.error.code or 0) < 600 else 500
    message = error.error.message if status < 500 else "The model failed to process the request."
    return APIError(status, message, param=getattr(error.error, "param", None))


def _sse(items: Any) -> str:
    """One engine stream item (a list of SSE strings when stream batching is off) as text."""
    if not isinstance(items, list):
        items = [items]
    return "".join(engine_error(i).sse() if isinstance(i, ErrorResponse) else i for i in items)


def _utc(value: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise invalid_request(f"'{name}' must be an ISO 8601 date or time.", param=name) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


class RouteTimeout(Exception):
    """No allowed replica took a restricted request within one routing attempt."""


def allowed_info(ranked: Ranked, providers: set[str]) -> RawRequestInfo:
    """What may serve a request, for the router: the replicas seen fit (best first), and
    the providers that fit (a replica of theirs that starts meanwhile fits too)."""
    providers = providers | {c.replica.provider_id for c in ranked.candidates}
    allow = Allowed(tuple(ranked.replica_ids), frozenset(providers))
    return RawRequestInfo(headers=allow.headers())


@dataclass
class Call:
    """One generation request on its way through the ingress."""

    endpoint: str
    request_id: str
    model: str = "unknown"
    started: float = field(default_factory=time.perf_counter)
    status: int = 500
    usage: Usage = field(default_factory=Usage)
    admitted: Admitted | None = None
    provider_id: str = NO_PROVIDER
    price: tuple[int, int] | None = None  # per token, of the provider that served

    def headers(self) -> dict[str, str]:
        headers = dict(self.admitted.headers) if self.admitted else {}
        if self.provider_id:
            headers[PROVIDER_HEADER] = self.provider_id
        return headers


@serve.deployment(
    name="ingress",
    max_ongoing_requests=1000,
    # on the operator's nodes only: provider nodes are not trusted with API keys
    ray_actor_options={"label_selector": CONTROL_SELECTOR},
)
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        catalog: Catalog,
        models: dict[str, DeploymentHandle],
        deployment_names: dict[str, str],
        model_sources: dict[str, str],
        billing: dict[str, Any],
        meter: DeploymentHandle,  # the billing actor: bound here so it is part of the app
    ) -> None:
        self._catalog = catalog
        self._handles = {model_id: h.options(stream=True) for model_id, h in models.items()}
        self._counters = {
            model_id: PromptCounter(source, catalog.by_id[model_id].context_length)
            for model_id, source in model_sources.items()
        }
        app_name = serve.get_replica_context().app_name
        self._availability = ReplicaAvailability(app_name, deployment_names)
        self._metrics = IngressMetrics()
        self._created = int(time.time())

        self._services = Services.create(billing, self._metrics)
        self._gate = self._services.gate
        db = self._services.db
        self._directory = ReplicaDirectory(
            connect(self._services.settings.redis_url, max_connections=8),
            RegistryTerms(lambda: provider_terms(db)),
        )
        self._tiers = AccountTiers(self._services.admission)
        api.state.services = self._services
        api.state.model_cards = self.model_cards  # the console's models page

    # --- health -------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> dict[str, Any]:
        online = await self._availability.online()
        waiting = sorted(set(self._handles) - online)
        if waiting or not self._handles:
            raise APIError(
                503,
                "Not ready: no replica online for " + (", ".join(waiting) or "any model"),
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        return {"status": "ready", "models": sorted(online)}

    # --- catalog ------------------------------------------------------------------------

    def _listed(self, model: CatalogModel) -> bool:
        """Local models are listed only where they are deployed (machines without a GPU)."""
        return not model.is_local or model.id in self._handles

    def _model(self, model_id: str) -> CatalogModel:
        model = self._catalog.get(model_id)
        if model is None or not self._listed(model):
            raise model_not_found(model_id)
        return model

    async def model_cards(self) -> list[dict[str, Any]]:
        """The listed catalog, with which models have a replica online now."""
        online = await self._availability.online()
        return [
            model_card(m, m.id in online, self._created)
            for m in self._catalog.models
            if self._listed(m)
        ]

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        await self._gate.account(request)
        return {"object": "list", "data": await self.model_cards()}

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, request: Request, model_id: str) -> dict[str, Any]:
        await self._gate.account(request)
        model = self._model(model_id)
        return model_card(model, await self._availability.is_online(model_id), self._created)

    # --- the account --------------------------------------------------------------------

    @api.get("/v1/credits")
    async def credits(self, request: Request) -> dict[str, Any]:
        account_id = await self._gate.account(request)
        summary = await asyncio.to_thread(
            credits_summary,
            self._services.db,
            self._services.redis,
            self._services.plans,
            account_id,
        )
        return {"object": "credits", **summary.to_json()}

    @api.get("/v1/usage")
    async def usage(
        self,
        request: Request,
        start: str | None = None,
        end: str | None = None,
        group_by: Literal["day", "model", "customer"] = "day",
    ) -> dict[str, Any]:
        account_id = await self._gate.account(request)
        now = datetime.now(UTC)
        until = _utc(end, "end") if end else now
        since = _utc(start, "start") if start else until - timedelta(days=30)
        if since >= until:
            raise invalid_request("'start' must be before 'end'.", param="start")
        rows = await asyncio.to_thread(
            usage_report, self._services.db, start=since, end=until, group_by=group_by,
            account_id=account_id,
        )  # fmt: skip
        return {
            "object": "list",
            "start": since.isoformat(),
            "end": until.isoformat(),
            "group_by": group_by,
            "data": [row.to_json() for row in rows],
        }

    # --- generation ---------------------------------------------------------------------

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._generate(request, Call("chat", request.state.request_id))

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._generate(request, Call("completions", request.state.request_id))

    async def _generate(self, request: Request, call: Call) -> Any:
        streaming = False
        try:
            body = decode_json(await request.body())
            model = self._model(require_model(body))
            call.model = model.id
            default_tier = await self._tiers.default_for(bearer_key(request))
            restricted = "provider" in body or default_tier is not None
            catalog = Price(model.input_nusd_per_token, model.output_nusd_per_token)
            requirements = parse_requirements(body.pop("provider", None), catalog, default_tier)
            parse = parse_chat if call.endpoint == "chat" else parse_completion
            parsed = parse(body, model, call.request_id)
            if (parsed.n or 1) > 1:
                raise invalid_request("Only n=1 is supported.", param="n")
            handle = self._handles.get(model.id)
            if handle is None:  # listed, but no node can hold it: nothing to reserve for
                await self._gate.account(request)  # a bad key is told so first
                raise no_replica(model.id, RETRY_AFTER_S)
            ranked = await self._rank(model, requirements, catalog, restricted)
            if isinstance(ranked, NoCandidate):
                await self._gate.account(request)  # a bad key is told so first
                raise no_candidate_error(ranked, RETRY_AFTER_S)
            reserve = None
            if ranked is not None:
                highest = ranked.highest
                reserve = (highest.input_nusd_per_token, highest.output_nusd_per_token)
            call.admitted = await self._admit(request, model, parsed, reserve)
            if not await self._availability.is_online(model.id):
                raise no_replica(model.id, RETRY_AFTER_S)
            method = getattr(handle, call.endpoint)
            if ranked is None:
                stream = method.remote(parsed)
                served_by, first = await self._open(stream)
            else:
                stream, served_by, first = await self._routed(
                    method, parsed, model, requirements, catalog, ranked
                )
            call.provider_id = served_by.provider_id
            served = provider_price(
                catalog,
                self._directory.price_floor_pct(served_by.provider_id, served_by.price_floor_pct),
            )
            call.price = (served.input_nusd_per_token, served.output_nusd_per_token)
            if not parsed.stream:
                payload = first.model_dump(mode="json")
                call.usage = Usage.from_dict(payload.get("usage"))
                call.status = 200
                return JSONResponse(payload, headers=call.headers())
            relay = SSERelay.for_options(body.get("stream_options"))
            streaming = True
            return StreamingResponse(
                self._relay(call, relay, first, stream),
                media_type="text/event-stream",
                headers=call.headers(),
            )
        except APIError as exc:
            call.status = exc.status
            self._metrics.observe_error(call.model, exc)
            exc.headers = {**call.headers(), **exc.headers}
            raise
        finally:
            if not streaming:
                self._finish(call)

    async def _rank(
        self, model: CatalogModel, requirements: Requirements, catalog: Price, restricted: bool
    ) -> Ranked | NoCandidate | None:
        """The candidates for a request, best first; None: route as before, unrestricted
        (no `"provider"` object, and no known replica priced above the catalog)."""
        replicas = await self._directory.replicas(model.id)
        if not restricted and all(r.price_floor_pct == 0 and not r.draining for r in replicas):
            return None
        return rank(replicas, requirements, catalog, model.id)

    async def _admit(
        self,
        request: Request,
        model: CatalogModel,
        parsed: Any,
        price: tuple[int, int] | None = None,
    ) -> Admitted:
        """Reserve the prompt and max_tokens; the engine then gets at most what was granted."""
        counter = self._counters[model.id]  # every deployed model has one
        if hasattr(parsed, "messages"):
            prompt_tokens = counter.chat(parsed.messages)
        else:
            prompt_tokens = counter.completion(parsed.prompt)
        limit_field = "max_completion_tokens" if getattr(parsed, "max_completion_tokens", None) \
            else "max_tokens"  # fmt: skip
        wanted = getattr(parsed, limit_field) or max(1, model.context_length - prompt_tokens)
        admitted = await self._gate.admit(request, model, prompt_tokens, wanted, price)
        setattr(parsed, limit_field, admitted.max_tokens)
        return admitted

    async def _routed(
        self,
        method: Any,
        parsed: Any,
        model: CatalogModel,
        requirements: Requirements,
        catalog: Price,
        ranked: Ranked,
    ) -> tuple[Any, ServedBy, Any]:
        """Send a restricted request; when no allowed replica takes it in time, route it
        again on a fresh reading of the replicas (never above the price reserved)."""
        limit = ranked.highest
        capped = Requirements(requirements.trust_tier, limit)  # never above the reservation
        for attempt in range(ROUTE_ATTEMPTS):
            registry = await self._directory.registry()
            providers = fitting_providers(registry, capped, catalog)
            stream = method.remote(parsed, allowed_info(ranked, providers))
            try:
                return (stream, *await self._open(stream, ROUTE_ATTEMPT_S))
            except RouteTimeout:
                logger.warning(
                    "no allowed replica took a restricted request in %.0f s (attempt %d; "
                    "replicas %s, providers %s); routing it again",
                    ROUTE_ATTEMPT_S, attempt + 1, ranked.replica_ids, sorted(providers),
                )  # fmt: skip
                replicas = await self._directory.refresh(model.id)
                again = rank(replicas, capped, catalog, model.id)
                if isinstance(again, Ranked):
                    ranked = again
        raise APIError(
            503,
            "No allowed provider took the request in time; retry shortly.",
            code="no_provider_online",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    async def _open(
        self, stream: Any, route_timeout_s: float | None = None
    ) -> tuple[ServedBy, Any]:
        """The replica's provider, and the first answer item (an engine error raises).

        `route_timeout_s`: how long a restricted request may wait for a replica to take it
        (raises RouteTimeout)."""
        try:
            served_by = await asyncio.wait_for(stream.__anext__(), route_timeout_s)
            first = await stream.__anext__()
        except TimeoutError:
            stream.cancel()
            raise RouteTimeout from None
        except (BackPressureError, RayError) as exc:
            logger.warning("model call failed: %s", exc)
            raise APIError(
                503,
                "The model is overloaded or its replica went away; retry shortly.",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        item = first[0] if isinstance(first, list) and first else first
        if isinstance(item, ErrorResponse):
            raise engine_error(item)
        return served_by, first if isinstance(first, list) else item

    async def _relay(
        self, call: Call, relay: SSERelay, first: Any, stream: Any
    ) -> AsyncGenerator[str, None]:
        try:
            yield self._relayed(call, relay, first)
            async for item in stream:
                yield self._relayed(call, relay, item)
            if not relay.done:
                yield "data: [DONE]\n\n"
            call.status = 500 if relay.error else 200
        except asyncio.CancelledError:
            call.status = 499  # the client went away; the engine request is cancelled with us
            raise
        except Exception:
            logger.exception("stream failed")
            yield APIError(500, "The stream was interrupted.").sse()
            yield "data: [DONE]\n\n"
        finally:
            call.usage = relay.usage  # what was processed and sent, up to the last chunk
            self._finish(call)

    def _relayed(self, call: Call, relay: SSERelay, item: Any) -> str:
        had_token = relay.first_token_seen
        text = relay.relay(_sse(item))
        if relay.first_token_seen and not had_token:
            self._metrics.observe_ttft(call.model, time.perf_counter() - call.started)
        return text

    def _finish(self, call: Call) -> None:
        """Settle what was used (nothing, if the engine produced nothing) and record it."""
        if call.admitted is not None:
            self._gate.settle(call.request_id, call.usage, call.provider_id, call.price)
        self._metrics.observe(
            endpoint=call.endpoint,
            model=call.model,
            status=call.status,
            seconds=time.perf_counter() - call.started,
            provider=call.provider_id,
            prompt_tokens=call.usage.prompt_tokens,
            completion_tokens=call.usage.completion_tokens,
        )
