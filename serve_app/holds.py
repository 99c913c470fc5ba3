"""Holds that live exactly as long as their request, as an ingress replica keeps them.

A hold (billing.admission) expires `hold_ttl_s` after it was last extended, and the billing
actor's reaper then settles it at its last checkpoint. So the ingress:

- extends every hold it has in flight, all in one Redis round trip, every third of the TTL
  (`HoldKeeper`): a request that outlives the TTL (a long stream, or a long answer computed
  before it is sent) is never reaped while its ingress lives; once the ingress dies, its
  holds expire within one TTL and are billed;
- checkpoints what a stream has delivered so far (`StreamCheckpoints`): at its first usage
  (the prompt, processed), then every `checkpoint_tokens` tokens or `CHECKPOINT_EVERY_S`
  seconds, whichever comes first, with at most one write in flight; never per chunk. A
  checkpoint is the usage of the chunks relayed before the current one: each of them was
  handed to Serve before the engine's next item came, so a replica that dies does not leave
  a checkpointed chunk unsent in its buffers (a checkpoint bills nothing undelivered). Its
  completion is the ingress's own count of the text delivered (`serve_app.recount`), never
  more than the engine reported, which the checkpoint keeps beside it.

A non-streaming answer is delivered whole or not at all: it needs no checkpoint, and an
ingress that dies before sending it bills nothing (the reaper settles its hold as zero).
Failures to extend or checkpoint are logged and tried again at the next turn: the hold is
settled by the request itself whenever its ingress lives.
"""

from __future__ import annotations

import asyncio
import logging
import time

from billing.admission import Admission
from serve_app.recount import RunningCount, billed
from serve_app.streaming import Usage

# A stream checkpoints at least this often while it delivers tokens.
CHECKPOINT_EVERY_S = 2.0
# A checkpoint's new text up to this many characters is counted on the event loop.
INLINE_COUNT_CHARS = 1024
# Holds extended per Redis call (a replica has up to `max_ongoing_requests` in flight).
EXTEND_BATCH = 500
logger = logging.getLogger("darkgpu.ingress")


class HoldKeeper:
    """The holds of one ingress replica's requests in flight, extended while they run."""

    def __init__(
        self, admission: Admission, *, checkpoint_tokens: int, every_s: float | None = None
    ) -> None:
        self._admission = admission
        self._checkpoint_tokens = max(1, checkpoint_tokens)
        # a third of the TTL: two turns may fail (Redis away) before a hold could expire
        self.every_s = every_s if every_s is not None else max(admission.hold_ttl_s / 3, 0.1)
        self._live: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def track(self, request_id: str) -> None:
        """Keep `request_id`'s hold open until `untrack` (call on the event loop)."""
        self._live.add(request_id)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="hold-keeper")

    def untrack(self, request_id: str) -> None:
        self._live.discard(request_id)

    def stream(
        self,
        request_id: str,
        provider_id: str,
        price: tuple[int, int] | None,
        running: RunningCount | None = None,
    ) -> StreamCheckpoints:
        """The checkpoints of one stream served by `provider_id` at `price` per token;
        `running`: the ingress's own count of what it delivered (see `StreamCheckpoints`)."""
        return StreamCheckpoints(
            self._admission, request_id, provider_id, price, self._checkpoint_tokens, running
        )

    async def extend_live(self) -> int:
        """Extend every hold in flight now; returns how many were open."""
        live = list(self._live)
        extended = 0
        for start in range(0, len(live), EXTEND_BATCH):
            extended += await self._admission.extend_many(live[start : start + EXTEND_BATCH])
        return extended

    async def _run(self) -> None:
        while self._live:
            await asyncio.sleep(self.every_s)
            try:
                await self.extend_live()
            except Exception as exc:  # Redis away: the next turn tries again
                logger.warning("could not extend %d holds: %r", len(self._live), exc)


class StreamCheckpoints:
    """Paces one stream's checkpoints: `delivered` is called once per chunk, and writes
    (in a task of its own, one at a time) only when enough was delivered since the last.

    With `running` (the ingress's count of the text it delivered, serve_app.recount), a
    checkpoint's completion is the least of that count and the engine's report, and the
    report is kept beside it: the reaper bills what the ingress counted, as settlement does.
    Each checkpoint counts only the text delivered since the previous one."""

    def __init__(
        self,
        admission: Admission,
        request_id: str,
        provider_id: str,
        price: tuple[int, int] | None,
        every_tokens: int,
        running: RunningCount | None = None,
        every_s: float = CHECKPOINT_EVERY_S,
    ) -> None:
        self._running = running
        self._admission = admission
        self._request_id = request_id
        self._provider_id = provider_id
        self._price = price
        self._every_tokens = every_tokens
        self._every_s = every_s
        self._written = Usage(-1, -1)  # nothing yet: the first usage is written at once
        self._written_at = 0.0
        self._writing: asyncio.Task[None] | None = None

    def delivered(self, usage: Usage) -> None:
        """The usage of the chunks handed to the client so far (a per-chunk path: a few
        comparisons unless a checkpoint is due)."""
        if not (usage.prompt_tokens or usage.completion_tokens):
            return
        written = self._written
        grown = usage.completion_tokens - written.completion_tokens
        if grown <= 0 and usage.prompt_tokens <= written.prompt_tokens:
            return
        if written.completion_tokens >= 0 and grown < self._every_tokens:
            if time.monotonic() - self._written_at < self._every_s:
                return
        if self._writing is not None and not self._writing.done():
            return  # one write at a time; the next chunk tries again
        self._written, self._written_at = usage, time.monotonic()
        # the text delivered so far is taken now, before the next chunk is relayed
        texts = self._running.pending() if self._running is not None else None
        self._writing = asyncio.create_task(self._write(usage, texts), name="hold-checkpoint")

    async def _write(self, usage: Usage, texts: list[str] | None) -> None:
        completion, reported = usage.completion_tokens, None
        try:
            if self._running is not None and texts is not None:
                if sum(map(len, texts)) > INLINE_COUNT_CHARS:
                    counted = await asyncio.to_thread(self._running.add, texts)
                else:
                    counted = self._running.add(texts)
                completion, reported = billed(counted, completion), completion
            await self._admission.checkpoint(
                request_id=self._request_id,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=completion,
                provider_id=self._provider_id,
                price=self._price,
                reported_completion_tokens=reported,
            )
        except Exception as exc:  # Redis away: a later checkpoint, or the settlement, follows
            logger.warning("checkpoint of request %s failed: %r", self._request_id, exc)
