"""Admission before inference and settlement after it, as the ingress sees them.

`billing.admission` decides (one Redis round trip each way); this module reads the request's
key and customer tag, turns a refusal into the OpenAI error with its headers, and settles in
a task of its own: off the response's path, and never cancelled with the request, so a
client that goes away is still billed what it was sent, and its reservation refunded.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import Request

from billing.admission import Admission, Admitted, Refused, Settlement
from cluster.catalog import CatalogModel
from kernel.errors import DarkGpuError
from serve_app.errors import error_of_status
from serve_app.metrics import IngressMetrics
from serve_app.streaming import Usage

CUSTOMER_HEADER = "x-customer-id"
logger = logging.getLogger("darkgpu.ingress")


def bearer_key(request: Request) -> str | None:
    return bearer_of(request.headers.get("authorization", ""))


def bearer_of(authorization: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` header value, or None."""
    scheme, _, key = authorization.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def refusal(refused: Refused) -> DarkGpuError:
    """Admission's refusal as the error of its status (the spec's type for it: `auth`,
    `billing`, `rate_limit`, ...), with its rate-limit headers and `Retry-After`."""
    headers = dict(refused.headers)
    has_retry_after = any(name.lower() == "retry-after" for name in headers)
    if refused.retry_after_s is not None and not has_retry_after:
        headers["Retry-After"] = str(refused.retry_after_s)
    return error_of_status(refused.status, refused.message, code=refused.code, headers=headers)


class Gate:
    def __init__(self, admission: Admission, metrics: IngressMetrics | None = None) -> None:
        self._admission = admission
        self._metrics = metrics  # admission and settlement latency
        self._settling: set[asyncio.Task[Settlement]] = set()

    async def key_refusal(self, key: str | None) -> DarkGpuError | None:
        """Why `key` may not make a request, or None: asked before a request's body is read
        (serve_app.body_guard), by admission's own rules, and counted as a refusal as the
        routes count theirs (the model is not known yet: `unknown`)."""
        result = await self._admission.authenticate(key)
        if not isinstance(result, Refused):
            return None
        error = refusal(result)
        if self._metrics is not None:
            self._metrics.observe_error("unknown", error)
        return error

    async def account(self, request: Request) -> int:
        """The caller's account, for requests that run no inference."""
        result = await self._admission.authenticate(bearer_key(request))
        if isinstance(result, Refused):
            raise refusal(result)
        return result

    async def admit(
        self,
        request: Request,
        model: CatalogModel,
        prompt_tokens: int,
        max_tokens: int,
        price: tuple[int, int] | None = None,
        completions: int = 1,
    ) -> Admitted:
        """`price`: per-token (input, output) nano-dollars to reserve at; default the
        catalog's. `completions`: sequences the engine generates, each up to `max_tokens`."""
        started = time.perf_counter()
        result = await self._admission.admit(
            api_key=bearer_key(request) or "",
            request_id=request.state.request_id,
            model=model,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            customer_tag=request.headers.get(CUSTOMER_HEADER),
            price=price,
            completions=completions,
        )
        if self._metrics is not None:
            admitted = not isinstance(result, Refused)
            self._metrics.observe_admission(time.perf_counter() - started, admitted)
        if isinstance(result, Refused):
            raise refusal(result)
        return result

    def settle(
        self,
        request_id: str,
        usage: Usage,
        provider_id: str,
        price: tuple[int, int] | None = None,
        model: str = "unknown",
    ) -> None:
        """`price`: the serving provider's per-token prices (capped at the reserved ones)."""
        task = asyncio.create_task(self._settle(request_id, usage, provider_id, price, model))
        self._settling.add(task)
        task.add_done_callback(self._settled)

    async def _settle(
        self,
        request_id: str,
        usage: Usage,
        provider_id: str,
        price: tuple[int, int] | None,
        model: str,
    ) -> Settlement:
        started = time.perf_counter()
        settled = await self._admission.settle_usage(
            request_id=request_id,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            provider_id=provider_id,
            price=price,
            reported_completion_tokens=usage.reported_completion_tokens,
        )
        if self._metrics is not None:
            self._metrics.observe_settlement(time.perf_counter() - started)
        if settled.overrun_tokens:
            # The reservation was too small for what the engine did: a bug in counting the
            # request's worst case. Billed as far as the balance allowed; never silent.
            logger.error(
                "RESERVATION OVERRUN: request %s (model %s, provider %s) used %d prompt + %d "
                "completion tokens, %d above its reservation; %d could not be billed",
                request_id, model, provider_id or "-", usage.prompt_tokens,
                usage.completion_tokens, settled.overrun_tokens, settled.unbilled_tokens,
            )  # fmt: skip
            if self._metrics is not None:
                self._metrics.observe_overrun(model, settled.overrun_tokens)
        return settled

    def _settled(self, task: asyncio.Task[Settlement]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The hold stays open; the billing actor's reaper settles it.
            logger.error("settlement failed: %r", task.exception())
