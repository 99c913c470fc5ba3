"""The ingress's side of the hop to a supply pool (`serve_app.pool_protocol`).

One HTTP client per ingress replica, kept alive (a pooled connection per request in flight).
Everything the pool answers is untrusted input: the provider who served is parsed strictly, a
whole answer is read up to `MAX_ANSWER_BYTES`, a stream's events up to `MAX_EVENT_BYTES` each,
and anything else the pool says (a refusal, a malformed header, a dropped connection) is a
503 to the client with nothing billed but what was delivered.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from kernel.errors import Unavailable
from serve_app.errors import engine_error
from serve_app.pool_protocol import (
    ENGINE_ERROR_HEADER,
    MAX_LIST_BYTES,
    MODEL_HEADER,
    REPLICAS_PATH,
    SERVED_BY_HEADER,
    PoolListing,
    ServedBy,
    parse_replicas,
    split_events,
)

RETRY_AFTER_S = 10
MAX_ANSWER_BYTES = 64 * 1024 * 1024
MAX_EVENT_BYTES = 4 * 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024
logger = logging.getLogger("darkgpu.ingress")


def unavailable(reason: str) -> Unavailable:
    logger.warning("the pool's answer was refused: %s", reason)
    return Unavailable(
        "The model is overloaded or its replica went away; retry shortly.",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _read(response: httpx.Response, limit: int) -> bytes:
    """The answer's body, at most `limit` bytes (a 503 past it)."""
    parts, size = [], 0
    async for part in response.aiter_bytes():
        size += len(part)
        if size > limit:
            raise unavailable(f"an answer of more than {limit} bytes")
        parts.append(part)
    return b"".join(parts)


async def _events(response: httpx.Response) -> AsyncIterator[str]:
    """The stream's server-sent events, whole (HTTP may cut them anywhere)."""
    buffer = ""
    async for text in response.aiter_text():
        whole, buffer = split_events(buffer + text)
        if whole:
            yield whole
        if len(buffer) > MAX_EVENT_BYTES:
            raise unavailable(f"an event of more than {MAX_EVENT_BYTES} bytes")
    if buffer.strip():
        logger.warning("the pool's stream ended inside an event (%d bytes dropped)", len(buffer))


@dataclass
class PoolAnswer:
    """A request a replica took: who serves it, and the whole answer or the stream's events."""

    served_by: ServedBy
    response: httpx.Response
    whole: dict[str, Any] | None = None

    def events(self) -> AsyncIterator[str]:
        return _events(self.response)

    async def aclose(self) -> None:
        """Let the pool go: closing the connection cancels the engine's request there."""
        await self.response.aclose()

    def close_soon(self) -> None:
        """`aclose`, from code that cannot await (a response's close callback)."""
        task = asyncio.get_running_loop().create_task(self.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[None]] = set()


class PoolClient:
    def __init__(self, url: str, credential: str, read_timeout_s: float) -> None:
        self._url = url.rstrip("/")
        self._client = httpx.AsyncClient(
            headers={"authorization": f"Bearer {credential}"},
            timeout=httpx.Timeout(read_timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )

    async def open(
        self,
        model_id: str,
        endpoint: str,
        body: str,
        stream: bool,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> PoolAnswer:
        """Send a request and wait until a replica took it (at most `timeout_s`:
        TimeoutError, and the pool is let go). An engine's refusal raises its error; any other
        refusal of the pool, a 503."""
        request = self._client.build_request(
            "POST",
            f"{self._url}/{endpoint}",
            content=body.encode(),
            headers={
                MODEL_HEADER: model_id,
                "content-type": "application/json",
                **(headers or {}),
            },  # fmt: skip
        )
        try:
            response = await asyncio.wait_for(self._client.send(request, stream=True), timeout_s)
        except httpx.HTTPError as exc:
            raise unavailable(f"{type(exc).__name__}: {exc}") from None
        try:
            return await self._answer(response, stream)
        except httpx.HTTPError as exc:  # the body cut or stalled (read timeout)
            await response.aclose()
            raise unavailable(f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            await response.aclose()
            raise

    async def replicas(self, timeout_s: float = 5.0) -> PoolListing:
        """The pool's model replicas (`serve_app.pool_protocol`): ValueError or an httpx
        error when the pool does not answer with a list."""
        request = self._client.build_request("GET", f"{self._url}/{REPLICAS_PATH}")
        response = await asyncio.wait_for(self._client.send(request, stream=True), timeout_s)
        try:
            if response.status_code != 200:
                raise ValueError(f"the pool's replicas: status {response.status_code}")
            return parse_replicas(await _read(response, MAX_LIST_BYTES))
        finally:
            await response.aclose()

    async def _answer(self, response: httpx.Response, stream: bool) -> PoolAnswer:
        if response.status_code != 200:
            raw = await _read(response, MAX_ERROR_BYTES)
            if response.headers.get(ENGINE_ERROR_HEADER):
                raise _engine_error(raw)
            raise unavailable(f"status {response.status_code}: {raw[:200]!r}")
        try:
            served_by = ServedBy.from_header(response.headers.get(SERVED_BY_HEADER))
        except ValueError as exc:
            raise unavailable(str(exc)) from None
        if stream:
            return PoolAnswer(served_by, response)
        try:
            whole = json.loads(await _read(response, MAX_ANSWER_BYTES))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise unavailable("an answer that is not JSON") from None
        if not isinstance(whole, dict):
            raise unavailable("an answer that is not a JSON object")
        return PoolAnswer(served_by, response, whole)

    async def aclose(self) -> None:
        await self._client.aclose()


def _engine_error(raw: bytes) -> Exception:
    try:
        error = json.loads(raw).get("error")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        error = None
    if not isinstance(error, dict):
        return unavailable("an engine error that is not one")
    return engine_error(error.get("code"), error.get("message"), error.get("param"))
