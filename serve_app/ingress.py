"""The ingress deployment: the OpenAI-compatible HTTP API in front of the model deployments.

Routes are thin. A generation request is parsed and checked (`schemas`), admitted against
the key, rate limit, daily caps and credits (`gate`, one Redis round trip), sent to the supply
pool over HTTP with the pool's credential (`pool_client`; the pool's gateway, `serve_app.pool`,
sends it over its model's handle, where the replica is chosen: `router`), relayed as JSON or
server-sent events (`streaming`), and settled with the prompt the engine reported and the
completion the ingress counted in what it delivered, never more than the engine reported
(`recount`: the engine runs on the provider's machine). Its hold
lives as long as it does: extended while it runs, and a stream's usage checkpointed into
it, what the reaper bills if this replica dies before settling (`holds`). Each
answer names the provider whose replica served it (`x-darkgpu-provider`); every response
names the request (`x-darkgpu-request-id`, `middleware`).

Routing among providers: before admission the ingress reads which replicas of the model are
up and on which provider's node (`replica_stats`, as the pool lists them), takes each
provider's trust tier, price floor and status from the provider registry (not from the
node's own labels), and ranks them against the request's `"provider"` object, or the
account's default tier (`account_tiers`), with `provider_policy`. No candidate: 503
`service_unavailable` with the reason, nothing reserved. Otherwise the reservation is made
at the highest price a candidate bills, the allowed replicas travel to the request router in
the pool call's headers (`router`: it takes no other), and settlement bills at the registry's
price of the provider that served. A request with no `"provider"` object and no account
default is held to the catalog price.

Every other route (the console, the site, sign-up, payments, webhooks, providers, the account's
credits and usage) is answered by the accounts deployment: this app only forwards it there
(`serve_app.forwarding`), so no password hash, Stripe call or SQL report runs on the replica
that streams tokens.

The HTTP app is built per replica by `serve_app.http_app.create_app`, once `__init__` has made
the connections: a fresh app holding the shared routes and this replica's own (`routes`),
which the replica serves on the platform's port itself (`serve_app.replica_http`: no Serve
proxy in front, every ingress replica on the port). No module-level app exists for a replica
to change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import ray
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from billing.admission import Admitted, connect
from cluster.catalog import Catalog, CatalogModel
from cluster.pools import pools
from cluster.registry import provider_terms
from core.settings import Settings
from kernel.errors import DarkGpuError, InternalError, Unavailable
from kernel.labels import CONTROL_SELECTOR
from serve_app.account_tiers import AccountTiers
from serve_app.errors import model_not_found, model_warming, no_replica, sse
from serve_app.gate import bearer_key
from serve_app.holds import HoldKeeper
from serve_app.http_app import create_app
from serve_app.metrics import IngressMetrics
from serve_app.models import model_source
from serve_app.node_bindings import NodeBindings
from serve_app.pool_client import NotTaken, PoolAnswer, PoolClient, Stalled
from serve_app.pool_protocol import MAX_ANSWER_WITHIN_S, TAKE_WITHIN_S
from serve_app.provider_policy import (
    DEMOTE_STRIKES,
    NoCandidate,
    Price,
    Ranked,
    Requirements,
    by_load,
    no_candidate_error,
    parse_requirements,
    provider_price,
    rank,
)
from serve_app.recount import Delivered, Ending, RunningCount, billed, echoed_prompts
from serve_app.replica_http import ReplicaHttpServer, ServesHttp
from serve_app.replica_stats import RegistryTerms, ReplicaDirectory
from serve_app.router import Allowed, InFlight
from serve_app.schemas import decode_json, parse_chat, parse_completion, require_model
from serve_app.services import Services
from serve_app.streaming import ClosingStream, SSERelay, Usage, told_billed
from serve_app.supply import Plan
from serve_app.supply_view import SupplyView
from serve_app.tokens import PromptCounter

PROVIDER_HEADER = "x-darkgpu-provider"
RETRY_AFTER_S = 10
# Bodies up to this size are counted on the event loop (well under a millisecond); larger ones
# in a thread, so a long prompt cannot hold up other requests.
INLINE_COUNT_BYTES = 16 * 1024
# A completion of up to this many characters is counted on the event loop; a longer one in a
# thread (the tiny model's tokenizer, on a loaded 2-core machine: 256 characters 0.4 ms,
# 4096 characters 5.8 ms).
INLINE_RECOUNT_CHARS = 1024
# A request whose allowed replicas went away or stay full (or whose new replica the ingress had
# not seen yet) waits this long for one to take it, then is routed again on a fresh reading.
# Once taken, the engine's first item has the time the request needs (`answer_within_s`); the
# pool's read timeout bounds each wait for its next bytes. A request is sent again only when
# nothing came of it: none took it, or the one that took it stalled (and was cancelled).
ROUTE_ATTEMPT_S = TAKE_WITHIN_S  # the pool's gateway's own default for it
ROUTE_ATTEMPTS = 10
MAX_STALLS = 2  # replicas that took a request and gave nothing, before it is refused
NO_PROVIDER = ""
logger = logging.getLogger("darkgpu.ingress")


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


def allowed_headers(ranked: Ranked, demoted: frozenset[str] = frozenset()) -> dict[str, str]:
    """What may serve a request, for the pool's router: the replicas seen fit (best first),
    and the providers to try last (recent usage strikes)."""
    demoted = demoted | {c.replica.provider_id for c in ranked.candidates if c.replica.demoted}
    return Allowed(tuple(ranked.replica_ids), frozenset(demoted)).headers()


def answer_within_s(settings: Settings, stream: bool, completion_tokens: int) -> float:
    """How long the replica that takes a request has to give its first item: a stream's first
    event within the base, a whole answer within the base and every completion token it may
    hold at the floor rate (at most the protocol's bound, which the pool would refuse past). A
    replica that gives nothing in that time stalled (its provider's engine is the provider's
    to hold back): it is cut and the request routed again without it, so that no replica
    holds a request for the connection's read timeout (`pool_read_timeout_s`, which still
    bounds every read)."""
    tokens = 0 if stream else completion_tokens
    wait = settings.pool_answer_base_s + tokens / settings.pool_answer_floor_tokens_per_s
    return min(wait, MAX_ANSWER_WITHIN_S)


@dataclass(frozen=True)
class Sent:
    """A generation request as the pool gets it: the engine's request, as JSON."""

    model_id: str
    endpoint: str
    body: str
    stream: bool
    answer_within_s: float  # for its first item once a replica took it: past it, it stalled


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
    replica: str = ""  # the replica that serves it, counted in flight until `_finish`
    prompt_counted: int | None = None  # the prompt tokens counted here: never billed more
    price: tuple[int, int] | None = None  # per token, of the provider that served
    relayed: bool = False  # the stream's relay began (it settles the call itself then)
    # the completion text a stream sent, counted as it goes (None: not a stream, or the
    # usage billed is known already: `usage.reported_completion_tokens` is set then)
    running: RunningCount | None = None

    def headers(self) -> dict[str, str]:
        headers = dict(self.admitted.headers) if self.admitted else {}
        if self.provider_id:
            headers[PROVIDER_HEADER] = self.provider_id
        return headers


class Ingress(ServesHttp):
    """One ingress replica: its connections, and the methods its routes call (`routes`).
    Serve runs it as `INGRESS` (below)."""

    def __init__(
        self,
        catalog: Catalog,
        billing: dict[str, Any],
        # bound here so that they are part of the app: the accounts routes' replica (every
        # route but inference is forwarded there), the billing actor, the supply reconciler
        accounts: DeploymentHandle[Any],
        meter: DeploymentHandle[Any],
        supply: DeploymentHandle[Any],
    ) -> None:
        self._catalog = catalog
        self._accounts = accounts
        self._counters: dict[str, PromptCounter] = {}  # made on first use, in a thread
        self._metrics = IngressMetrics()
        self._created = int(time.time())

        self._services = Services.create(billing, self._metrics)
        self._gate = self._services.gate
        settings = self._services.settings
        db = self._services.db
        # each trust tier's pool; a request goes to the pool of the replica it is sent to
        self._pools = {
            tier: PoolClient(pool.url, pool.credential(), settings.pool_read_timeout_s)
            for tier, pool in pools(settings).items()
        }
        # the supply reconciler publishes its plan to the state Redis
        state = connect(settings.state_redis_url, max_connections=8)
        self._supply = SupplyView(state, settings.model_load_s)
        own_node = ray.get_runtime_context().get_node_id()
        control = frozenset({own_node, *settings.control_node_ids})
        self._directory = ReplicaDirectory(
            {tier: client.replicas for tier, client in self._pools.items()},
            RegistryTerms(lambda: provider_terms(db)),
            NodeBindings(db, control),
            on_online=self._supply.online,
        )
        self._tiers = AccountTiers(self._services.admission)
        self._recounting: set[asyncio.Task[None]] = set()
        self._in_flight = InFlight()  # this replica's requests per model replica
        self._holds = HoldKeeper(
            self._services.admission,
            checkpoint_tokens=self._services.settings.checkpoint_tokens,
        )
        # the platform's front door: this replica's own HTTP server (`serve_app.replica_http`;
        # the control plane's cluster runs no Serve proxy), its port shared by every replica
        self._http = ReplicaHttpServer(self.app(), settings.http_host, settings.http_port)

    async def let_go(self) -> None:
        """Once no request is in flight: the pools' connections."""
        for client in self._pools.values():
            await client.aclose()

    def app(self) -> FastAPI:
        """This replica's app (a fresh one each call; the constructor serves one)."""
        return create_app(
            self._services,
            self.routes(),
            max_context_tokens=max(m.context_length for m in self._catalog.models),
            forward=self._accounts.handle.remote,
        )

    def routes(self) -> APIRouter:
        """The ingress's own routes, answered by this replica's methods."""
        router = APIRouter()
        for path, endpoint, method in (
            ("/healthz", self.healthz, "GET"),
            ("/readyz", self.readyz, "GET"),
            ("/v1/models", self.list_models, "GET"),
            ("/v1/models/{model_id:path}", self.get_model, "GET"),
            ("/v1/chat/completions", self.chat_completions, "POST"),
            ("/v1/completions", self.completions, "POST"),
        ):
            router.add_api_route(path, endpoint, methods=[method])
        return router

    # --- health -------------------------------------------------------------------------

    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    async def readyz(self) -> dict[str, Any]:
        """Ready once the supply reconciler has published its plan and every warm model of it
        has a replica online (none deployed: ready, with nothing to serve)."""
        plan = await self._supply.plan()
        online = await self._directory.online()
        if plan is None:
            raise Unavailable(
                "Not ready: no supply plan yet", headers={"Retry-After": str(RETRY_AFTER_S)}
            )
        waiting = {m for m, supply in plan.models.items() if supply.warm} - online
        if waiting:
            raise Unavailable(
                "Not ready: no replica online for " + ", ".join(sorted(waiting)),
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        return {"status": "ready", "models": sorted(online & set(plan.models))}

    # --- catalog ------------------------------------------------------------------------

    @staticmethod
    def _listed(model: CatalogModel, plan: Plan | None) -> bool:
        """The CPU engine's local models are listed only where the platform serves them (no
        node has a GPU); every other catalog model always."""
        return not model.is_local or (plan is not None and plan.local)

    async def _model(self, model_id: str) -> CatalogModel:
        model = self._catalog.get(model_id)
        if model is None or not self._listed(model, await self._supply.plan()):
            raise model_not_found(model_id)
        return model

    async def _available(self) -> frozenset[str]:
        """The models deployed now with a replica online."""
        plan = await self._supply.plan()
        online = await self._directory.online()
        return online & frozenset(plan.models) if plan is not None else frozenset()

    async def model_cards(self) -> list[dict[str, Any]]:
        """The listed catalog, with which models have a replica online now."""
        plan = await self._supply.plan()
        available = await self._available()
        return [
            model_card(m, m.id in available, self._created)
            for m in self._catalog.models
            if self._listed(m, plan)
        ]

    async def list_models(self, request: Request) -> dict[str, Any]:
        await self._gate.account(request)
        return {"object": "list", "data": await self.model_cards()}

    async def get_model(self, request: Request, model_id: str) -> dict[str, Any]:
        await self._gate.account(request)
        model = await self._model(model_id)
        return model_card(model, model.id in await self._available(), self._created)

    async def _counter(self, model: CatalogModel) -> PromptCounter:
        """The model's prompt counter: its tokenizer, loaded in a thread on first use."""
        counter = self._counters.get(model.id)
        if counter is None:
            source = model_source(model, self._services.settings)
            counter = await asyncio.to_thread(PromptCounter, source, model.context_length)
            self._counters[model.id] = counter
        return counter

    # --- generation ---------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Any:
        return await self._generate(request, Call("chat", request.state.request_id))

    async def completions(self, request: Request) -> Any:
        return await self._generate(request, Call("completions", request.state.request_id))

    async def _generate(self, request: Request, call: Call) -> Any:
        streaming = False
        try:
            raw = await request.body()
            body = decode_json(raw)
            model = await self._model(require_model(body))
            call.model = model.id
            default_tier = await self._tiers.default_for(bearer_key(request))
            catalog = Price(model.input_nusd_per_token, model.output_nusd_per_token)
            requirements = parse_requirements(body.pop("provider", None), catalog, default_tier)
            parse = parse_chat if call.endpoint == "chat" else parse_completion
            parsed = parse(body, model, call.request_id)
            await self._deployed(request, model)
            ranked = await self._rank(model, requirements, catalog)
            if isinstance(ranked, NoCandidate):
                await self._gate.account(request)  # a bad key is told so first
                raise no_candidate_error(ranked, RETRY_AFTER_S)
            highest = ranked.highest
            reserve = (highest.input_nusd_per_token, highest.output_nusd_per_token)
            call.admitted, call.prompt_counted, completions = await self._admit(
                request, model, parsed, reserve, len(raw)
            )
            self._holds.track(call.request_id)  # until `_finish`
            self._supply.asked(model.id)  # demand keeps the model warm
            if not await self._directory.is_online(model.id):
                raise no_replica(model.id, RETRY_AFTER_S)
            stream = bool(parsed.stream)
            within = answer_within_s(
                self._services.settings, stream, call.admitted.max_tokens * completions
            )
            sent = Sent(model.id, call.endpoint, parsed.model_dump_json(exclude_unset=True),
                        stream, within)  # fmt: skip
            answer = await self._routed(sent, model, requirements, catalog, ranked)
            served_by = answer.served_by
            call.provider_id = served_by.provider_id
            call.replica = served_by.replica
            self._in_flight.sent(call.replica)
            served = provider_price(
                catalog,
                self._directory.price_floor_pct(served_by.provider_id, served_by.price_floor_pct),
            )
            call.price = (served.input_nusd_per_token, served.output_nusd_per_token)
            delivered = Delivered(Ending.of(parsed), echoed_prompts(parsed, parsed.n or 1))
            count = (await self._counter(model)).texts
            if answer.whole is not None:
                payload = answer.whole
                call.usage = await self._billed(payload, delivered, count, call.prompt_counted)
                call.status = 200
                return JSONResponse(payload, headers=call.headers())
            relay = SSERelay.for_options(
                body.get("stream_options"),
                n=parsed.n or 1,
                delivered=delivered,
                running=RunningCount(delivered, count),
                prompt_cap=call.prompt_counted,
            )
            streaming = True
            return ClosingStream(
                self._relay(call, relay, answer),
                on_close=partial(self._unrelayed, call, answer),
                media_type="text/event-stream",
                headers=call.headers(),
            )
        except DarkGpuError as exc:  # answered by serve_app.errors, with the call's headers
            call.status = exc.status
            self._metrics.observe_error(call.model, exc)
            exc.headers = {**call.headers(), **exc.headers}
            raise
        finally:
            if not streaming:
                self._finish(call)

    async def _deployed(self, request: Request, model: CatalogModel) -> None:
        """Refuse, before anything is reserved, a request for a model that no node may hold
        (503 `no_provider_online`), or whose replica is still starting (503 `model_warming`,
        `Retry-After` the measured load time). A warming model's request, once its key is
        known good, counts as demand, which warms a cold model (`serve_app.supply`)."""
        plan = await self._supply.plan()
        if plan is None or model.id not in plan.models:
            await self._gate.account(request)  # a bad key is told so first
            raise no_replica(model.id, RETRY_AFTER_S)
        if not await self._directory.is_online(model.id):
            account = await self._gate.account(request)
            self._supply.asked(model.id, refused_account=account)
            raise model_warming(model.id, self._supply.retry_after_s(model.id))

    async def _rank(
        self, model: CatalogModel, requirements: Requirements, catalog: Price
    ) -> Ranked | NoCandidate:
        """The candidates for a request, best first: the replicas on nodes bound to the
        provider they name (`serve_app.replica_stats`) whose registry terms fit it. The
        pool's router takes only these (`serve_app.router`)."""
        replicas = await self._directory.replicas(model.id)
        if not replicas:  # online by Serve's word (`_deployed`): a replica just started
            replicas = await self._directory.refresh(model.id)
        # a replica's load as it reports it, or as this ingress has it in flight if more
        ours = self._in_flight
        replicas = [replace(r, load=max(r.load, ours[r.replica_id])) for r in replicas]
        return rank(replicas, requirements, catalog, model.id)

    async def _admit(
        self,
        request: Request,
        model: CatalogModel,
        parsed: Any,
        price: tuple[int, int] | None = None,
        body_bytes: int = 0,
    ) -> tuple[Admitted, int, int]:
        """Reserve the request's worst case: every prompt's tokens as the engine renders them,
        and max_tokens for each completion (prompts x n); the engine then gets at most the
        max_tokens granted, per completion. Returns the admission, the prompt tokens and the
        completions. Templating and tokenizing a large body run in a thread; a small one (well
        under a millisecond) inline, since a thread's hand-offs of the GIL cost more than that
        (measured: ~15 ms at c=1 in bench/serving_overhead.py)."""
        counter = await self._counter(model)
        count: Callable[[Any], list[int]] = (
            (lambda chat: [counter.chat(chat)])
            if hasattr(parsed, "messages")
            else counter.completion
        )
        if body_bytes > INLINE_COUNT_BYTES:
            prompts = await asyncio.to_thread(count, parsed)
        else:
            prompts = count(parsed)
        completions = len(prompts) * (parsed.n or 1)
        limit_field = "max_completion_tokens" if getattr(parsed, "max_completion_tokens", None) \
            else "max_tokens"  # fmt: skip
        wanted = getattr(parsed, limit_field) or max(1, model.context_length - max(prompts))
        admitted = await self._gate.admit(
            request, model, sum(prompts), wanted, price, completions=completions
        )
        setattr(parsed, limit_field, admitted.max_tokens)
        return admitted, sum(prompts), completions

    async def _routed(
        self,
        sent: Sent,
        model: CatalogModel,
        requirements: Requirements,
        catalog: Price,
        ranked: Ranked,
    ) -> PoolAnswer:
        """Send a request to the pool of its best candidate, with the replicas there that may
        take it; when none of them takes it in time (gone, or full), route it again on a fresh
        reading of the replicas (never above the price reserved). A replica that took it and
        then stalled (`answer_within_s`) is left out from then on; after `MAX_STALLS`
        stalls, or when no other replica may take it, a 503."""
        limit = ranked.highest
        capped = Requirements(requirements.trust_tier, limit)  # never above the reservation
        stalled: set[str] = set()
        for attempt in range(ROUTE_ATTEMPTS):
            registry = await self._directory.registry()
            demoted = frozenset(
                p for p, terms in registry.items() if terms.recent_strikes >= DEMOTE_STRIKES
            )
            # the pool of the best candidate by what is in flight now: each pool's router
            # balances its own replicas, the ingress the pools (a burst spreads over them)
            ranked = by_load(ranked, self._in_flight.__getitem__).in_pool()
            headers = allowed_headers(ranked, demoted)
            first = ranked.replica_ids[0]
            self._in_flight.sent(first)  # counted from dispatch until the pool answers
            try:
                return await self._pools[ranked.pool].open(
                    sent.model_id, sent.endpoint, sent.body, sent.stream, headers,
                    ROUTE_ATTEMPT_S, sent.answer_within_s,
                )  # fmt: skip
            except NotTaken:  # no listed replica took it: routed again, a 503 after the last
                logger.warning(
                    "no allowed replica took a request in %.0f s (attempt %d; replicas %s); "
                    "routing it again",
                    ROUTE_ATTEMPT_S, attempt + 1, ranked.replica_ids,
                )  # fmt: skip
            except Stalled as exc:  # it took it and gave nothing: never again for this request
                stalled.add(exc.served_by.replica)
                logger.warning(
                    "replica %s of provider %s took a request and gave nothing in %.0f s; %s",
                    exc.served_by.replica, exc.served_by.provider_id, sent.answer_within_s,
                    "refusing it" if len(stalled) >= MAX_STALLS else "routing it again",
                )  # fmt: skip
                if len(stalled) >= MAX_STALLS:
                    break
            finally:
                self._in_flight.completed(first)
            replicas = await self._directory.refresh(model.id)
            again = rank([r for r in replicas if r.replica_id not in stalled],
                         capped, catalog, model.id)  # fmt: skip
            if isinstance(again, Ranked):
                ranked = again
            elif stalled:  # the only replicas that could take it stalled
                break
        raise Unavailable(
            "No allowed provider answered the request in time; retry shortly."
            if stalled
            else "No allowed provider took the request in time; retry shortly.",
            code="no_provider_online",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    async def _relay(
        self, call: Call, relay: SSERelay, answer: PoolAnswer
    ) -> AsyncGenerator[str, None]:
        call.relayed = True
        call.running = relay.running
        checkpoints = self._holds.stream(
            call.request_id, call.provider_id, call.price, relay.running
        )
        first = True
        try:
            async for events in answer.events():
                if not first:
                    # the chunks yielded before these were handed to Serve before they came
                    checkpoints.delivered(relay.usage)
                first = False
                yield self._relayed(call, relay, events)
            if not relay.done:
                yield "data: [DONE]\n\n"
            call.status = 500 if relay.error else 200
        except asyncio.CancelledError:
            call.status = 499  # the client went away; the engine request is cancelled with us
            raise
        except Exception:
            logger.exception("stream failed")
            yield sse(InternalError("The stream was interrupted."))
            yield "data: [DONE]\n\n"
        finally:
            answer.close()  # the pool lets the engine's request go, if it still runs
            # what was processed and sent, up to the last chunk: as the final usage chunk
            # told the client, or else counted at settlement (`_recount`)
            call.usage = relay.billed or relay.usage
            if relay.billed is not None:
                call.running = None
            self._finish(call)

    def _unrelayed(self, call: Call, answer: PoolAnswer) -> None:
        """The response ended before its relay began (the client left before the first
        byte): stop the engine and settle here, billing nothing, since nothing was sent."""
        if call.relayed:
            return
        answer.close()
        call.status = 499
        self._finish(call)

    async def _billed(
        self, payload: dict[str, Any], delivered: Delivered, count: Any, prompt_cap: int | None
    ) -> Usage:
        """A whole answer's usage as billed: its completion counted here (in a thread when
        long), never above the engine's report, and its prompt never above the ingress's
        count; the answer's `usage` is rewritten to it."""
        reported = Usage.from_dict(payload.get("usage")).capped(prompt_cap)
        delivered.add_response(payload)
        if delivered.size > INLINE_RECOUNT_CHARS:
            counted = await asyncio.to_thread(delivered.count, count)
        else:
            counted = delivered.count(count)
        usage = payload.get("usage")
        if not isinstance(usage, dict):
            return Usage(reported.prompt_tokens, billed(counted, 0), 0)
        return told_billed(usage, reported, counted)

    async def _recount(self, call: Call, running: RunningCount, reported: Usage) -> None:
        """Count what a stream delivered since its last count (in a thread when long) and
        settle the call at the least of its count and the engine's report, keeping the
        report beside it: a stream that ended without its final usage chunk (the client
        left, or did not ask for usage)."""
        texts = running.pending()
        try:
            if sum(map(len, texts)) > INLINE_RECOUNT_CHARS:
                counted = await asyncio.to_thread(running.add, texts)
            else:
                counted = running.add(texts)
        except Exception:  # a bug here must not lose the usage: the engine's word, logged
            logger.exception("counting request %s's completion failed", call.request_id)
            counted = reported.completion_tokens
        usage = Usage(
            reported.prompt_tokens,
            billed(counted, reported.completion_tokens),
            reported.completion_tokens,
        )
        self._gate.settle(call.request_id, usage, call.provider_id, call.price, model=call.model)

    def _recounted(self, task: asyncio.Task[None]) -> None:
        self._recounting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # the hold stays open; the billing actor's reaper settles it at its checkpoint
            logger.error("settlement failed: %r", task.exception())

    def _relayed(self, call: Call, relay: SSERelay, events: str) -> str:
        had_token = relay.first_token_seen
        text = relay.relay(events)
        if relay.first_token_seen and not had_token:
            self._metrics.observe_ttft(call.model, time.perf_counter() - call.started)
        return text

    def _finish(self, call: Call) -> None:
        """Settle what was used (nothing, if the engine produced nothing) and record it:
        the completion billed is the ingress's count of what it delivered, never more than
        the engine reported (counted before a whole answer or a stream's final usage chunk
        is sent, which tell the client that figure; otherwise in `_recount`)."""
        if call.replica:
            self._in_flight.completed(call.replica)
            call.replica = ""
        if call.admitted is not None:
            self._holds.untrack(call.request_id)
            if call.running is None:
                self._gate.settle(
                    call.request_id, call.usage, call.provider_id, call.price, model=call.model
                )
            else:
                task = asyncio.create_task(self._recount(call, call.running, call.usage))
                self._recounting.add(task)
                task.add_done_callback(self._recounted)
        self._metrics.observe(
            endpoint=call.endpoint,
            model=call.model,
            status=call.status,
            seconds=time.perf_counter() - call.started,
            provider=call.provider_id,
            prompt_tokens=call.usage.prompt_tokens,
            completion_tokens=call.usage.completion_tokens,
        )


# Serve's decorator applied by call, not with `@`, so that `serve_app.ingress.Ingress` stays
# the class itself: Ray then pickles it by reference and a replica runs its methods with this
# module's globals. Pickled by value (a decorated class is not importable under its name),
# a method's globals hold only the names its code uses, and FastAPI, resolving the routes'
# postponed annotations there, would take `request: Request` for a query parameter.
INGRESS = serve.deployment(
    name="ingress",
    max_ongoing_requests=1000,
    # on the operator's nodes only: provider nodes are not trusted with API keys
    ray_actor_options={"label_selector": CONTROL_SELECTOR},
)(Ingress)
