"""The control plane's HTTP applications, built by one function.

`create_app` makes a fresh FastAPI app each time: the request-id middleware (outermost), the
body guard (the key before the body, every body bounded), the
one mapping of errors to the OpenAI shape (`serve_app.errors`), the public routes (provider,
payment, console, public-site, provider-installer, the account's credits and usage:
`PUBLIC_ROUTERS`), and the routers it is given (the ingress's own: models, generation). Two
replicas build one each: the accounts deployment answers the public routes
(`serve_app.accounts`); the inference ingress, its own, and forwards the public ones there
(`serve_app.forwarding`). Nothing is built at import and nothing is changed after: each
replica asks for its app once it has made its connections
(`Ingress.__serve_build_asgi_app__`), and tests build one the same way around real SQLite
and Redis.

A Redis that refuses a write because it is full (`OOM`: the money Redis never evicts, so at
its `maxmemory` it refuses writes instead of dropping a balance) or is out of reach answers
503 `service_unavailable` with `Retry-After`, in the OpenAI shape, wherever a route meets it:
nothing was reserved or billed (a refused write changes nothing), and the client may retry.
"""

from __future__ import annotations

import logging

import redis.exceptions
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from kernel.errors import Unavailable
from serve_app import (
    console,
    routes_account,
    routes_caps,
    routes_install,
    routes_keys,
    routes_market,
    routes_nodes,
    routes_payments,
    routes_providers,
    site,
)
from serve_app.body_guard import BodyGuard, inference_body_limit
from serve_app.console.account_routes import ModelCards
from serve_app.errors import error_response, install_error_handlers
from serve_app.forwarding import Send, mirrored_routes
from serve_app.middleware import RequestIdMiddleware
from serve_app.services import Services

logger = logging.getLogger("darkgpu.ingress")
# The routes of the console, the site, sign-up, payments, keys, caps, providers, nodes, and
# the account's credits and usage: every route but the ingress's own (`Ingress.routes`)
PUBLIC_ROUTERS = (routes_providers.router, routes_payments.router, routes_keys.router,
                  routes_caps.router, console.router, site.router, routes_install.router,
                  routes_nodes.router, routes_market.router, routes_account.router)  # fmt: skip
REDIS_RETRY_AFTER_S = 5
# Refusals of Redis that retrying later may cure: it is full (noeviction at maxmemory), away,
# or slow. Other Redis errors are bugs and stay 500s.
_REDIS_UNAVAILABLE = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


def create_app(
    services: Services,
    *routers: APIRouter,
    model_cards: ModelCards | None = None,
    max_context_tokens: int = 0,
    forward: Send | None = None,
) -> FastAPI:
    """`services`: the replica's connections, reached by routes with `Depends(services)`;
    `model_cards`: absent where no ingress runs (the console's models page then says the
    catalog is not available); `max_context_tokens`: the largest context of the models served,
    which bounds an inference request's body (`serve_app.body_guard`); `forward`: where the
    public routes are answered, when not here (the inference ingress sends them to the
    accounts deployment: `serve_app.forwarding`)."""
    app = FastAPI(title="DarkGPU", docs_url=None, redoc_url=None, openapi_url=None)
    # Added first, so it runs inside the request-id middleware: its 401s and 413s carry an id.
    app.add_middleware(
        BodyGuard,
        check_key=services.gate.key_refusal,
        inference_limit=inference_body_limit(max_context_tokens),
    )
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    for cls in _REDIS_UNAVAILABLE:
        app.add_exception_handler(cls, _redis_unavailable)
    app.state.services = services
    app.state.model_cards = model_cards
    for router in routers:
        app.include_router(router)
    if forward is None:
        for router in PUBLIC_ROUTERS:
            app.include_router(router)
    else:
        app.router.routes.extend(mirrored_routes(PUBLIC_ROUTERS, forward))
    return app


async def _redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("Redis refused %s %s: %r", request.method, request.url.path, exc)
    return error_response(
        Unavailable(
            "The service is temporarily unavailable; please retry shortly.",
            code="storage_unavailable",
            headers={"Retry-After": str(REDIS_RETRY_AFTER_S)},
        )
    )
