"""Server-sent events from the engine, relayed to the client with usage kept on our side.

The engine is always asked for usage on every chunk (`continuous_usage_stats`), so the
ingress knows the tokens processed and delivered at any point, a disconnect included. The
client gets usage only as it asked: none, or OpenAI's final usage chunk
(`stream_options.include_usage`), or every chunk (`continuous_usage_stats`).

A chunk's continuous usage is its own choice's: the prompt of that choice's prompt and the
tokens generated for that choice so far (vLLM, for `n` > 1 and prompt lists). The usage so
far is therefore the sum over choices, each prompt counted once (completions number their
choices prompt by prompt, `n` each); the engine's final usage chunk, when it comes, is the
total itself.

The relay also keeps the text of every chunk it relays (`delivered`, serve_app.recount): the
completion the ingress bills is its own count of that text, never more than the engine's
word, and the final usage chunk tells the client that figure (`told_billed`). Continuous
usage on the other chunks is the engine's running report, as relayed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serve_app.errors import body, engine_error
from serve_app.recount import Delivered, RunningCount, billed

DONE = "[DONE]"


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # the engine's own completion count where `completion_tokens` is the ingress's (recount)
    reported_completion_tokens: int | None = None

    @classmethod
    def from_dict(cls, usage: dict[str, Any] | None) -> Usage:
        usage = usage or {}
        return cls(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))

    def capped(self, prompt_cap: int | None) -> Usage:
        """This usage with its prompt no more than `prompt_cap`: the prompt tokens the
        ingress counted itself, as the engine renders them (serve_app.tokens), where an
        engine on a provider's machine could report more."""
        if prompt_cap is None or self.prompt_tokens <= prompt_cap:
            return self
        return Usage(max(0, prompt_cap), self.completion_tokens, self.reported_completion_tokens)


class SSERelay:
    """Rewrites engine SSE text for the client and records the usage so far."""

    def __init__(
        self,
        include_usage: bool,
        continuous_usage: bool,
        n: int = 1,
        delivered: Delivered | None = None,
        running: RunningCount | None = None,
        prompt_cap: int | None = None,
    ) -> None:
        self.include_usage = include_usage or continuous_usage
        self.continuous_usage = continuous_usage
        self.usage = Usage()  # as the engine reports it
        self.delivered = delivered if delivered is not None else Delivered()
        self.running = running
        self._prompt_cap = prompt_cap  # the prompt tokens the ingress counted
        self.billed: Usage | None = None  # the final usage as told to the client
        self._n = max(1, n)  # choices per prompt
        self._choices: dict[int, Usage] = {}  # the latest usage of each choice
        self.first_token_seen = False
        self.error: dict[str, Any] | None = None
        self.done = False

    @classmethod
    def for_options(
        cls,
        stream_options: dict[str, Any] | None,
        n: int = 1,
        delivered: Delivered | None = None,
        running: RunningCount | None = None,
        prompt_cap: int | None = None,
    ) -> SSERelay:
        """A relay that gives the client the usage its `stream_options` asked for (`n`:
        the request's choices per prompt; `delivered`: where the relayed text is kept;
        `running`: the count of it that the final usage chunk tells)."""
        options = stream_options or {}
        return cls(
            include_usage=bool(options.get("include_usage")),
            continuous_usage=bool(options.get("continuous_usage_stats")),
            n=n,
            delivered=delivered,
            running=running,
            prompt_cap=prompt_cap,
        )

    def relay(self, text: str) -> str:
        out = []
        for event in text.split("\n\n"):
            if not event.strip():
                continue
            rewritten = self._event(event)
            if rewritten is not None:
                out.append(rewritten)
        return "".join(f"data: {data}\n\n" for data in out)

    def _event(self, event: str) -> str | None:
        data = event.removeprefix("data: ").strip()
        if data == DONE:
            self.done = True
            return DONE
        chunk = json.loads(data)
        if "error" in chunk:  # the engine's own shape: told in the spec's
            raw = chunk["error"] if isinstance(chunk["error"], dict) else {}
            told = body(engine_error(raw.get("code"), raw.get("message"), raw.get("param")))
            self.error = told["error"]
            return json.dumps(told, separators=(",", ":"))
        choices = chunk.get("choices") or []
        self.delivered.add_chunk(chunk)
        if chunk.get("usage"):
            self._count(Usage.from_dict(chunk["usage"]), choices)
        if any(_has_output(c) for c in choices):
            self.first_token_seen = True
        if not choices:  # the final usage-only chunk: the usage billed
            if not self.include_usage:
                return None
            if self.running is not None and isinstance(chunk.get("usage"), dict):
                self.billed = told_billed(chunk["usage"], self.usage, self.running.total())
                return json.dumps(chunk, separators=(",", ":"))
            return data
        if self.continuous_usage:
            return data
        if self.include_usage:
            chunk["usage"] = None
        else:
            chunk.pop("usage", None)
        return json.dumps(chunk, separators=(",", ":"))

    def _count(self, usage: Usage, choices: list[dict[str, Any]]) -> None:
        if not choices:  # the final usage chunk: the engine's total
            self.usage = usage.capped(self._prompt_cap)
            return
        for choice in choices:
            self._choices[int(choice.get("index") or 0)] = usage
        prompts = {i // self._n: u.prompt_tokens for i, u in self._choices.items()}
        completion = sum(u.completion_tokens for u in self._choices.values())
        self.usage = Usage(sum(prompts.values()), completion).capped(self._prompt_cap)


def told_billed(usage: dict[str, Any], reported: Usage, counted: int) -> Usage:
    """Rewrite an answer's usage (in place) to what is billed: its completion is the
    ingress's count of what it delivered, never more than the engine reported, and its
    prompt `reported`'s (capped at the ingress's count). Returns the usage to settle."""
    completion = billed(counted, reported.completion_tokens)
    usage["prompt_tokens"] = reported.prompt_tokens
    usage["completion_tokens"] = completion
    usage["total_tokens"] = reported.prompt_tokens + completion
    return Usage(reported.prompt_tokens, completion, reported.completion_tokens)


def _has_output(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta")
    if delta is not None:
        return bool(delta.get("content") or delta.get("tool_calls") or delta.get("reasoning"))
    return bool(choice.get("text"))


class ClosingStream(StreamingResponse):
    """A StreamingResponse that calls `on_close` when it is done, however it ends.

    When the client leaves before the first byte, Starlette cancels the response before it
    starts iterating the body, so the body generator's own `finally` never runs: `on_close`
    is where the ingress settles such a request instead (it checks whether the relay ran)."""

    def __init__(self, content: Any, *, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
