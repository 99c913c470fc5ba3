"""Nothing is read from a request body before its key is checked, and no body is unbounded.

A pure ASGI middleware in front of the routes. For the inference routes it checks the
`Authorization` key first with `KeyCheck` (a malformed key with no lookup, a well-formed one
with one; a known-good key is remembered for a few seconds) and refuses a bad one with
401 before a byte of the body is read from the connection, so an unauthenticated client cannot
make the ingress receive, parse or tokenize anything. Admission still checks the key, with its
limits, in the same Lua call as always: this only decides whether the body is worth reading.

Every request's body is bounded: a `Content-Length` over the limit is refused with 413 before
reading; a body without one (chunked) is counted as it is read and refused with 413 when it
passes the limit. Inference routes have the limit derived from the largest context in the
catalog (`inference_body_limit`); every other route a small one.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kernel.errors import DarkGpuError, PayloadTooLarge
from serve_app.errors import error_response
from serve_app.gate import bearer_of

INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
OTHER_BODY_LIMIT = 1 << 20  # 1 MiB: sign-up, checkout, webhooks, provider calls, console forms
# The most a prompt token can take in a JSON body: a byte-level token is a few bytes of text,
# each byte at most a 6-byte `\uXXXX` escape; token ids are at most 7 bytes with their comma.
_BYTES_PER_TOKEN = 32
_BODY_OVERHEAD = 1 << 20  # messages' framing, tools, sampling parameters

KeyCheck = Callable[[str | None], Awaitable[DarkGpuError | None]]
"""The refusal for an API key (missing, malformed, unknown, revoked, a disabled account), or
None when it is good: `Gate.key_refusal` (no lookup for a malformed key)."""


def inference_body_limit(max_context_tokens: int) -> int:
    """The largest body an inference request can need: its whole context as text."""
    return max_context_tokens * _BYTES_PER_TOKEN + _BODY_OVERHEAD


def content_length(headers: Headers) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


@dataclass
class GoodKeys:
    """Keys that passed `KeyCheck` lately, so a busy key costs no extra lookup. Only good
    answers are kept: a bad key is looked up every time (and refused by admission anyway)."""

    ttl_s: float = 5.0
    max_size: int = 100_000
    _until: dict[str, float] = field(default_factory=dict)

    def __contains__(self, key: str) -> bool:
        until = self._until.get(key)
        return until is not None and until > time.monotonic()

    def add(self, key: str) -> None:
        if len(self._until) >= self.max_size:
            now = time.monotonic()
            self._until = {k: t for k, t in self._until.items() if t > now}
            if len(self._until) >= self.max_size:
                self._until.clear()
        self._until[key] = time.monotonic() + self.ttl_s


class BodyGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        check_key: KeyCheck,
        inference_limit: int,
        other_limit: int = OTHER_BODY_LIMIT,
        good_keys: GoodKeys | None = None,
    ) -> None:
        self.app = app
        self.check_key = check_key
        self.inference_limit = inference_limit
        self.other_limit = other_limit
        self.good_keys = good_keys or GoodKeys()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        inference = scope["path"] in INFERENCE_PATHS
        headers = Headers(scope=scope)
        if inference:
            refusal = await self._check(bearer_of(headers.get("authorization", "")))
            if refusal is not None:
                await _answer(refusal, scope, send)
                return
        limit = self.inference_limit if inference else self.other_limit
        declared = content_length(headers)
        if declared is not None and declared > limit:
            await _answer(_too_large(limit), scope, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, _bounded(receive, limit), tracked)
        except BodyTooLarge as exc:  # the app let it through: answer it here
            if started:
                raise
            await _answer(exc, scope, send)

    async def _check(self, key: str | None) -> DarkGpuError | None:
        if key and key in self.good_keys:
            return None
        refusal = await self.check_key(key)
        if refusal is None and key:
            self.good_keys.add(key)
        return refusal


class BodyTooLarge(PayloadTooLarge):
    """Raised from `receive` when a body without a Content-Length passes the limit."""


def _too_large(limit: int) -> PayloadTooLarge:
    return BodyTooLarge(f"The request body is larger than {limit} bytes.", code="request_too_large")


def _bounded(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def bounded() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit)
        return message

    return bounded


async def _answer(error: DarkGpuError, scope: Scope, send: Send) -> None:
    await error_response(error)(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
