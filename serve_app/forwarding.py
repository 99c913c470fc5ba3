"""The inference ingress hands every route that is not inference to the accounts deployment.

Serve routes HTTP by application prefix, and the console, sign-up, payments, webhooks,
provider and account routes share `/v1` with generation; so the ingress answers them, but
only by forwarding: each of their routes is mirrored on the ingress's app (same path, same
methods, so a wrong method is still 405 and an unknown path 404) by an endpoint that sends
the request, as plain data (`Forwarded`), over a handle to the accounts deployment
(`serve_app.accounts`), which runs it through its own app (`call_app`) and returns the whole
answer (`Reply`). argon2, Stripe, SMTP and SQL then run in that replica, never in the one
that streams tokens; the ingress only relays bytes.

What travels is what the accounts app must see as the client sent it: method, path, query,
headers, body, the peer's address (the console's sign-in throttle counts per network) and the
request's id (one id per request, named by the ingress's `RequestIdMiddleware`). The body was
bounded by the ingress's body guard before it was read. An answer's headers come back as a
list (several `Set-Cookie`s survive); its request-id header is left to the ingress, which
stamps the same id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message

from kernel.errors import Unavailable
from serve_app.middleware import REQUEST_ID_HEADER

logger = logging.getLogger("darkgpu.ingress")
RETRY_AFTER_S = 5
_REQUEST_ID = REQUEST_ID_HEADER.encode()


@dataclass(frozen=True)
class Forwarded:
    """One HTTP request, as the ingress received it."""

    method: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None
    server: tuple[str, int | None] | None
    scheme: str
    request_id: str


@dataclass(frozen=True)
class Reply:
    """The accounts app's whole answer to a `Forwarded` request."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


Send = Callable[[Forwarded], Awaitable[Reply]]


def mirrored_routes(routers: Iterable[APIRouter], send: Send) -> list[BaseRoute]:
    """A route per route of `routers`, same path and methods, whose endpoint forwards."""

    async def forward(request: Request) -> Response:
        scope = request.scope
        forwarded = Forwarded(
            method=request.method,
            path=scope["path"],
            raw_path=scope.get("raw_path") or scope["path"].encode(),
            query_string=scope.get("query_string", b""),
            headers=list(scope["headers"]),
            body=await request.body(),
            client=tuple(scope["client"]) if scope.get("client") else None,
            server=tuple(scope["server"]) if scope.get("server") else None,
            scheme=scope.get("scheme", "http"),
            request_id=request.state.request_id,
        )
        try:
            reply = await send(forwarded)
        except Exception as exc:  # noqa: BLE001 - the accounts replica is away or failed
            logger.warning("forwarding %s %s failed: %r", request.method, scope["path"], exc)
            raise Unavailable(
                "The service is temporarily unavailable; please retry shortly.",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        response = Response(status_code=reply.status)
        response.raw_headers = [(k, v) for k, v in reply.headers if k.lower() != _REQUEST_ID]
        response.body = reply.body
        return response

    probe = APIRouter()
    for router in routers:
        probe.include_router(router)
    return [
        Route(route.path, forward, methods=list(methods), include_in_schema=False)
        for route in probe.routes
        if isinstance(route, Route) and (methods := getattr(route, "methods", None))
    ]


async def call_app(app: ASGIApp, request: Forwarded) -> Reply:
    """Run a forwarded request through `app` (the accounts app) and gather its answer."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.raw_path,
        "root_path": "",
        "query_string": request.query_string,
        "headers": request.headers,
        "client": request.client,
        "server": request.server,
        "state": {"request_id": request.request_id},
    }
    answered = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await answered.wait()  # the client stays until the answer is whole
        return {"type": "http.disconnect"}

    status, headers, chunks = 500, [], []

    async def send(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    finally:
        answered.set()
    return Reply(status, headers, b"".join(chunks))
