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

from billing.admission import Admission, Admitted, Refused
from cluster.catalog import CatalogModel
from serve_app.errors import APIError
from serve_app.metrics import IngressMetrics
from serve_app.streaming import Usage

CUSTOMER_HEADER = "x-customer-id"
logger = logging.getLogger("darkgpu.ingress")


def bearer_key(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def refusal(refused: Refused) -> APIError:
    headers = dict(refused.headers)
    has_retry_after = any(name.lower() == "retry-after" for name in headers)
    if refused.retry_after_s is not None and not has_retry_after:
        headers["Retry-After"] = str(refused.retry_after_s)
    return APIError(
        refused.status, refused.message, type=refused.type, code=refused.code, headers=headers
    )


class Gate:
    def __init__(self, admission: Admission, metrics: IngressMetrics | None = None) -> None:
        self._admission = admission
        self._metrics = metrics  # admission and settlement latency
        self._settling: set[asyncio.Task[bool]] = set()

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
    ) -> Admitted:
        """`price`: per-token (input, output) nano-dollars to reserve at; default the
        catalog's."""
        started = time.perf_counter()
        result = await self._admission.admit(
            api_key=bearer_key(request) or "",
            request_id=request.state.request_id,
            model=model,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            customer_tag=request.headers.get(CUSTOMER_HEADER),
            price=price,
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
    ) -> None:
        """`price`: the serving provider's per-token prices (capped at the reserved ones)."""
        task = asyncio.create_task(self._settle(request_id, usage, provider_id, price))
        self._settling.add(task)
        task.add_done_callback(self._settled)

    async def _settle(
        self, request_id: str, usage: Usage, provider_id: str, price: tuple[int, int] | None
    ) -> bool:
        started = time.perf_counter()
        settled = await self._admission.settle(
            request_id=request_id,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            provider_id=provider_id,
            price=price,
        )
        if self._metrics is not None:
            self._metrics.observe_settlement(time.perf_counter() - started)
        return settled

    def _settled(self, task: asyncio.Task[bool]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The hold stays open; the billing actor's reaper settles it.
            logger.error("settlement failed: %r", task.exception())
