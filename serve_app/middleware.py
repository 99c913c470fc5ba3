"""Every response, errors included, carries `x-darkgpu-request-id`.

A pure ASGI middleware, outermost: it names the request (the id is then the idempotency key
through admission, settlement and the ledger), stamps the header on the response, and turns
any exception that escaped everything else into a plain 500 in the OpenAI shape.
"""

from __future__ import annotations

import logging
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kernel.errors import InternalError
from serve_app.errors import UNEXPECTED, error_response

REQUEST_ID_HEADER = "x-darkgpu-request-id"
logger = logging.getLogger("darkgpu.ingress")


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # a request the inference ingress forwarded keeps the id it was given there
        # (`serve_app.forwarding`: set in the scope, never taken from a client's header)
        state = scope.setdefault("state", {})
        request_id = state.get("request_id") or new_request_id()
        state["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s failed", request_id)
            if started:
                raise
            response = error_response(InternalError(UNEXPECTED))
            await response(scope, receive, send_with_id)
