"""A supply pool's Serve application: the gateway through which the ingress reaches the models.

DESIGN's two planes: model replicas run on providers' machines, and Ray trusts every node of
a cluster, so the models live in a pool's own Serve application and the control plane's
ingress reaches them only over HTTP, with the pool's credential (`serve_app.pool_protocol`
says what travels). The gateway checks the credential, sends the request over its model's
handle, where the request router chooses the replica (`serve_app.router`, among those the
ingress listed in its headers), and answers once a replica took it: who serves
(`x-darkgpu-served-by`), then the engine's answer as it comes. It also lists the pool's
replicas to the ingress (`GET <pool>/replicas`: where the pool's GCS placed each, and what
each reports; `serve_app.pool_replicas`; and which models have a replica Serve routes to:
`serve_app.availability`) and its nodes (`GET <pool>/nodes`: the GCS's
table), and drains those the control plane says must go (`POST <pool>/drain`): what only a
member of the pool's cluster can read or ask. It reads nothing of the request but its
headers (the model replica parses the body, on its own machine) and keeps no state: a
request is never settled here, and the ingress counts what it delivers.

It holds no secret and no state of the control plane: the catalog, the SHA-256 of the
credential, and the settings the model replicas' configs are made of
(`serve_app.pool_models.MODEL_SETTINGS`). It deploys the models the control plane's supply
reconciler asks for (`PUT <pool>/models`, `serve_app.pool_models`). Which replicas may take
a request the ingress decides and lists in its headers (from the registry and the node
bindings, which stay in the control plane); the router keeps only those.

The pool is a Ray cluster of its own (`darkgpu up` starts its head: `cluster.local`), which
providers' nodes join, and never the control plane's: the gateway answers HTTP itself
(`serve_app.replica_http`; the pool runs no Serve proxy), only under `/pool`, on
`pool_http_port`. A provider's node can run code anywhere in the pool (Ray trusts every
node of a cluster) and read everything the pool holds: nothing of the control plane's
(docs/security.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from cluster.catalog import Catalog, load_catalog
from cluster.nodes import cluster_nodes
from cluster.pools import pools
from cluster.ray_internals import DrainingNodes, ErrorResponse, RawRequestInfo, drain_node
from core.settings import Settings
from kernel.errors import AuthError, DarkGpuError, InvalidRequest, NotFound, Unavailable
from kernel.labels import CONTROL_SELECTOR, TrustTier
from serve_app.availability import ReplicaAvailability
from serve_app.errors import error_response
from serve_app.models import deployment_name, model_app_name
from serve_app.pool_models import ModelApplier, model_settings
from serve_app.pool_protocol import (
    ANSWER_WITHIN_HEADER,
    DRAIN_PATH,
    ENDPOINTS,
    ENGINE_ERROR_HEADER,
    MODEL_HEADER,
    MODELS_PATH,
    NODES_PATH,
    NOT_TAKEN_HEADER,
    REPLICAS_PATH,
    SERVED_BY_HEADER,
    STALLED_HEADER,
    TAKE_WITHIN_HEADER,
    ServedBy,
    credential_digest,
    credential_matches,
    engine_error_body,
    nodes_body,
    parse_answer_within,
    parse_drain,
    parse_models,
    parse_take_within,
    replicas_body,
)
from serve_app.pool_replicas import PoolReplicas
from serve_app.replica_http import ReplicaHttpServer, ServesHttp
from serve_app.router import ALLOWED_HEADERS, REPLICAS_HEADER

POOL_APP_NAME = "pool"
POOL_ROUTE_PREFIX = "/pool"
RETRY_AFTER_S = 10
DRAIN_DEADLINE_S = 30  # Serve moves a drained node's replicas away within it
logger = logging.getLogger("darkgpu.pool")


def _event(item: Any) -> str:
    """One engine stream item (SSE text, a list of them, or an error) as SSE text; an error
    in the engine's own shape (the ingress's relay tells it in the spec's)."""
    if isinstance(item, list):
        return "".join(_event(i) for i in item)
    if isinstance(item, ErrorResponse):
        return f"data: {item.model_dump_json()}\n\n"
    return str(item)


class PoolGateway(ServesHttp):
    def __init__(
        self,
        catalog: Catalog,
        credential_sha256: str,
        settings: dict[str, Any],
        http: tuple[str, int],
    ) -> None:
        self._models = {m.id: m for m in catalog.models}
        self._applier = ModelApplier(catalog, Settings(**model_settings(settings)))
        self._digest = credential_sha256
        self._handles: dict[str, DeploymentHandle[Any]] = {}
        self._replicas = PoolReplicas({model_app_name(m): m.id for m in catalog.models})
        self._availability = ReplicaAvailability(
            {m.id: (model_app_name(m), deployment_name(m)) for m in catalog.models}
        )
        self._gcs_address = ray.get_runtime_context().gcs_address
        self._draining = DrainingNodes(self._gcs_address)
        self._admin: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
            ("GET", REPLICAS_PATH): self._list_replicas,
            ("GET", NODES_PATH): self._list_nodes,
            ("POST", DRAIN_PATH): self._drain,
            ("PUT", MODELS_PATH): self._put_models,
        }
        # the pool's front door: this replica's own HTTP server (`serve_app.replica_http`;
        # the pool's cluster runs no Serve proxy)
        self._http = ReplicaHttpServer(self._asgi, *http)

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The gateway as an ASGI app: everything under `/pool`; nothing else is here."""
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == POOL_ROUTE_PREFIX or path.startswith(POOL_ROUTE_PREFIX + "/"):
            response = await self(Request(scope, receive))
        else:
            response = error_response(NotFound("Not found: the pool answers under /pool only."))
        await response(scope, receive, send)

    def _handle(self, model_id: str) -> DeploymentHandle[Any]:
        """The model application's handle (deployed after this replica started, maybe:
        Serve resolves the name when a request is sent)."""
        handle = self._handles.get(model_id)
        if handle is None:
            model = self._models[model_id]
            found = serve.get_deployment_handle(deployment_name(model), model_app_name(model))
            handle = self._handles[model_id] = found.options(stream=True)
        return handle

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._call(request)
        except DarkGpuError as exc:
            return error_response(exc)

    async def _call(self, request: Request) -> Response:
        if not credential_matches(request.headers.get("authorization"), self._digest):
            raise AuthError("The pool's credential is missing or wrong.", code="invalid_api_key")
        endpoint = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        admin = self._admin.get((request.method, endpoint))
        if admin is not None:
            return await admin(request)
        model_id = request.headers.get(MODEL_HEADER, "")
        if request.method != "POST" or endpoint not in ENDPOINTS or model_id not in self._models:
            raise NotFound("No such model or endpoint in this pool.")
        if REPLICAS_HEADER not in request.headers:  # the router would take it nowhere
            raise InvalidRequest(
                f"The request lists no replica that may take it ({REPLICAS_HEADER})."
            )
        headers = {name: request.headers[name] for name in ALLOWED_HEADERS
                   if name in request.headers}  # fmt: skip
        take_within = parse_take_within(request.headers.get(TAKE_WITHIN_HEADER))
        answer_within = parse_answer_within(request.headers.get(ANSWER_WITHIN_HEADER))
        info = RawRequestInfo(headers=headers)
        body = (await request.body()).decode()
        stream = getattr(self._handle(model_id), endpoint).remote(body, info)
        taking, answering = asyncio.timeout(take_within), asyncio.timeout(answer_within)
        served_by: Any = None
        try:
            async with taking:  # a replica takes it: it starts on it, and says who it is
                served_by = await anext(stream)
            async with answering:  # the engine's first item: as long as the ingress allows
                first = await anext(stream)
        except (BackPressureError, RayError) as exc:
            stream.cancel()
            logger.warning("model call failed: %s", exc)
            raise Unavailable(
                "The model is overloaded or its replica went away; retry shortly.",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        except BaseException:  # the ingress left (cancelled) before a replica answered
            stream.cancel()
            if taking.expired():  # none of the listed replicas took it: the ingress routes again
                raise Unavailable(
                    "No listed replica took the request in time.",
                    headers={NOT_TAKEN_HEADER: "1", "Retry-After": str(RETRY_AFTER_S)},
                ) from None
            if answering.expired() and isinstance(served_by, ServedBy):  # it took it, then stalled
                logger.warning(
                    "replica %s of provider %s took a request and gave nothing in %g s",
                    served_by.replica, served_by.provider_id, answer_within,
                )  # fmt: skip
                raise Unavailable(
                    "The replica that took the request gave nothing in time.",
                    headers={STALLED_HEADER: "1", SERVED_BY_HEADER: served_by.header(),
                             "Retry-After": str(RETRY_AFTER_S)},
                ) from None  # fmt: skip
            raise
        item = first[0] if isinstance(first, list) and first else first
        if not isinstance(served_by, ServedBy):
            stream.cancel()
            raise Unavailable("The model's replica answered out of turn; retry shortly.")
        said = {SERVED_BY_HEADER: served_by.header()}
        if isinstance(item, ErrorResponse):
            stream.cancel()
            code = item.error.code
            return JSONResponse(
                engine_error_body(item.error.model_dump(mode="json")),
                status_code=code if 400 <= code < 600 else 500,
                headers={**said, ENGINE_ERROR_HEADER: "1"},
            )
        if not isinstance(item, str):  # a whole answer (the engine's response model)
            return Response(item.model_dump_json(), media_type="application/json", headers=said)
        return StreamingResponse(
            self._relay(first, stream), media_type="text/event-stream", headers=said
        )

    async def _list_replicas(self, request: Request) -> Response:
        online = await self._availability.online()
        listed = await self._replicas.current()
        return Response(replicas_body(listed, online), media_type="application/json")

    async def _list_nodes(self, request: Request) -> Response:
        def read() -> bytes:
            return nodes_body(cluster_nodes(self._draining.node_ids()))

        return Response(await asyncio.to_thread(read), media_type="application/json")

    async def _drain(self, request: Request) -> Response:
        node_id, reason = parse_drain(await request.body())
        try:
            accepted = await asyncio.to_thread(
                drain_node, self._gcs_address, node_id, reason, DRAIN_DEADLINE_S
            )
        except Exception as exc:  # noqa: BLE001 - the GCS away or refusing: say so, plainly
            logger.warning("draining node %s failed: %r", node_id, exc)
            raise Unavailable("The pool could not ask its GCS to drain the node.") from None
        logger.warning("drain of node %s asked (%s): accepted %s", node_id, reason, accepted)
        return JSONResponse({"accepted": accepted})

    async def _put_models(self, request: Request) -> Response:
        wanted = parse_models(await request.body(), self._models)
        await asyncio.to_thread(self._applier.apply, wanted)
        return JSONResponse({"models": sorted(wanted)})

    @staticmethod
    async def _relay(first: Any, stream: Any) -> AsyncGenerator[str, None]:
        """The stream's events as the engine wrote them; when the ingress leaves, Starlette
        cancels this and the engine's request is cancelled with it."""
        try:
            yield _event(first)
            async for item in stream:
                yield _event(item)
        finally:
            stream.cancel()


# Applied by call, not with `@`, so that `PoolGateway` stays the class itself (pickled by
# reference: see serve_app.ingress's INGRESS).
POOL_GATEWAY = serve.deployment(
    name="pool-gateway",
    max_ongoing_requests=1000,
    # on the pool's own head (labelled the control role there; the warden drains any other
    # node that claims it)
    ray_actor_options={"num_cpus": 0, "label_selector": CONTROL_SELECTOR},
)(PoolGateway)


def pool_arguments(
    args: dict[str, Any] | None = None, tier: TrustTier = TrustTier.basic
) -> dict[str, Any]:
    """What a tier's pool's gateway is bound with, as JSON (it crosses to the pool's own
    deploy process, run as the pool's user: `cluster.pool_user`): the catalog, the pool's
    credential's SHA-256, only what the model replicas' configs are made of, and where the
    gateway listens (the pool's `http_host`, `http_port`). Nothing secret of the control
    plane: it reaches Serve's checkpoint of the pool (test_pool_app)."""
    settings = Settings(**(args or {}))
    models_dir = str(settings.resolved_local_models_dir)  # the pool reads no data directory
    pool = pools(settings)[tier]
    return {
        "http": [pool.settings.http_host, pool.settings.http_port],
        "catalog": load_catalog(settings.models_file).model_dump(mode="json"),
        "credential_sha256": credential_digest(pool.credential()),
        "settings": model_settings(
            {**settings.model_dump(mode="json"), "local_models_dir": models_dir}
        ),
    }


def bind_pool_app(arguments: dict[str, Any]) -> Application:
    return POOL_GATEWAY.bind(
        Catalog.model_validate(arguments["catalog"]),
        str(arguments["credential_sha256"]),
        dict(arguments["settings"]),
        (str(arguments["http"][0]), int(arguments["http"][1])),
    )


def build_pool_app(args: dict[str, Any] | None = None) -> Application:
    """A pool's application (`serve deploy configs/pool.yaml`, and `darkgpu up`): `args` are
    settings, and `tier`, the pool's (basic unless said)."""
    args = dict(args or {})
    return bind_pool_app(pool_arguments(args, TrustTier(args.pop("tier", TrustTier.basic))))
