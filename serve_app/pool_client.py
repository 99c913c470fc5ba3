"""The ingress's side of the hop to a supply pool (`serve_app.pool_protocol`).

One HTTP client per ingress replica, kept alive (a pooled connection per request in flight):
aiohttp's, made on the replica's event loop at its first call (httpx's asynchronous client
took 1.5-3 ms more per request at c=1 against the same gateway, side by side in one process;
issue 13). Everything the pool answers is untrusted input: the provider who served is parsed
strictly, a whole answer is read up to `MAX_ANSWER_BYTES`, a stream's events up to
`MAX_EVENT_BYTES` each, and anything else the pool says (a refusal, a malformed header, a
dropped connection) is a 503 to the client with nothing billed but what was delivered.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from kernel.errors import Unavailable
from serve_app.errors import engine_error
from serve_app.pool_protocol import (
    ANSWER_WITHIN_HEADER,
    ENGINE_ERROR_HEADER,
    MAX_LIST_BYTES,
    MODEL_HEADER,
    NOT_TAKEN_HEADER,
    REPLICAS_PATH,
    SERVED_BY_HEADER,
    STALLED_HEADER,
    TAKE_WITHIN_HEADER,
    TAKE_WITHIN_S,
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


class NotTaken(Exception):  # noqa: N818 - what happened, not a failure of the pool
    """None of the replicas the request listed took it in time (gone, or full)."""


class Stalled(Exception):  # noqa: N818 - what a replica did, not a failure of the pool
    """The replica that took the request gave nothing in the time it was given."""

    def __init__(self, served_by: ServedBy) -> None:
        super().__init__(f"replica {served_by.replica} of {served_by.provider_id} stalled")
        self.served_by = served_by


def unavailable(reason: str) -> Unavailable:
    logger.warning("the pool's answer was refused: %s", reason)
    return Unavailable(
        "The model is overloaded or its replica went away; retry shortly.",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _read(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The answer's body, at most `limit` bytes (a 503 past it)."""
    parts, size = [], 0
    async for part in response.content.iter_any():
        size += len(part)
        if size > limit:
            raise unavailable(f"an answer of more than {limit} bytes")
        parts.append(part)
    return b"".join(parts)


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The stream's server-sent events, whole (HTTP may cut them anywhere, a character's
    bytes too)."""
    buffer = ""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    async for part in response.content.iter_any():
        whole, buffer = split_events(buffer + decoder.decode(part))
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
    response: aiohttp.ClientResponse
    whole: dict[str, Any] | None = None

    def events(self) -> AsyncIterator[str]:
        return _events(self.response)

    def close(self) -> None:
        """Let the pool go: closing a connection still answering cancels the engine's
        request there (one whose answer was read whole went back to the pool already)."""
        self.response.close()


class PoolClient:
    def __init__(self, url: str, credential: str, read_timeout_s: float) -> None:
        self._url = url.rstrip("/")
        self._headers = {"authorization": f"Bearer {credential}"}
        self._timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        """The session, made on the running loop (aiohttp binds it to the loop it is made on)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                auto_decompress=False,  # the gateway compresses nothing
                raise_for_status=False,
            )
        return self._session

    async def open(
        self,
        model_id: str,
        endpoint: str,
        body: str,
        stream: bool,
        headers: dict[str, str] | None = None,
        take_within_s: float = TAKE_WITHIN_S,
        answer_within_s: float | None = None,
    ) -> PoolAnswer:
        """Send a request; a replica listed in `headers` has `take_within_s` to take it, else
        `NotTaken` (the ingress routes it again). Then the engine's first item (the whole
        answer, or a stream's first event) within `answer_within_s` once taken, else
        `Stalled`; none: as long as it takes (each read at most the read timeout). An
        engine's refusal raises its error; any other refusal of the pool, a 503."""
        sent = {MODEL_HEADER: model_id, TAKE_WITHIN_HEADER: f"{take_within_s:g}",
                "content-type": "application/json", **(headers or {})}  # fmt: skip
        if answer_within_s is not None:
            sent[ANSWER_WITHIN_HEADER] = f"{answer_within_s:g}"
        try:
            response = await self._client().post(
                f"{self._url}/{endpoint}", data=body.encode(), headers=sent
            )
        except aiohttp.ClientError as exc:  # its read timeout too (a TimeoutError as well)
            raise unavailable(f"{type(exc).__name__}: {exc}") from None
        if response.status == 503 and response.headers.get(NOT_TAKEN_HEADER):
            response.close()
            raise NotTaken
        if response.status == 503 and response.headers.get(STALLED_HEADER):
            response.close()
            try:
                stalled = ServedBy.from_header(response.headers.get(SERVED_BY_HEADER))
            except ValueError as exc:
                raise unavailable(str(exc)) from None
            raise Stalled(stalled)
        try:
            return await self._answer(response, stream)
        except aiohttp.ClientError as exc:  # the body cut or stalled (read timeout)
            response.close()
            raise unavailable(f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            response.close()
            raise

    async def replicas(self, timeout_s: float = 5.0) -> PoolListing:
        """The pool's model replicas (`serve_app.pool_protocol`): ValueError or aiohttp's
        error when the pool does not answer with a list."""
        sent = self._client().get(f"{self._url}/{REPLICAS_PATH}")
        response = await asyncio.wait_for(sent, timeout_s)
        try:
            if response.status != 200:
                raise ValueError(f"the pool's replicas: status {response.status}")
            return parse_replicas(await _read(response, MAX_LIST_BYTES))
        finally:
            response.close()

    async def _answer(self, response: aiohttp.ClientResponse, stream: bool) -> PoolAnswer:
        if response.status != 200:
            raw = await _read(response, MAX_ERROR_BYTES)
            if response.headers.get(ENGINE_ERROR_HEADER):
                raise _engine_error(raw)
            raise unavailable(f"status {response.status}: {raw[:200]!r}")
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
        if self._session is not None:
            await self._session.close()


def _engine_error(raw: bytes) -> Exception:
    try:
        error = json.loads(raw).get("error")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        error = None
    if not isinstance(error, dict):
        return unavailable("an engine error that is not one")
    return engine_error(error.get("code"), error.get("message"), error.get("param"))
