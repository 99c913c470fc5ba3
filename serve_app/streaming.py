"""Server-sent events from the engine, relayed to the client with usage kept on our side.

The engine is always asked for usage on every chunk (`continuous_usage_stats`), so the
ingress knows the tokens processed and delivered at any point, a disconnect included. The
client gets usage only as it asked: none, or OpenAI's final usage chunk
(`stream_options.include_usage`), or every chunk (`continuous_usage_stats`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

DONE = "[DONE]"


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def from_dict(cls, usage: dict[str, Any] | None) -> Usage:
        usage = usage or {}
        return cls(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


class SSERelay:
    """Rewrites engine SSE text for the client and records the latest usage seen."""

    def __init__(self, include_usage: bool, continuous_usage: bool) -> None:
        self.include_usage = include_usage or continuous_usage
        self.continuous_usage = continuous_usage
        self.usage = Usage()
        self.first_token_seen = False
        self.error: dict[str, Any] | None = None
        self.done = False

    @classmethod
    def for_options(cls, stream_options: dict[str, Any] | None) -> SSERelay:
        """A relay that gives the client the usage its `stream_options` asked for."""
        options = stream_options or {}
        return cls(
            include_usage=bool(options.get("include_usage")),
            continuous_usage=bool(options.get("continuous_usage_stats")),
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
        if "error" in chunk:
            self.error = chunk["error"]
            return data
        if chunk.get("usage"):
            self.usage = Usage.from_dict(chunk["usage"])
        choices = chunk.get("choices") or []
        if any(_has_output(c) for c in choices):
            self.first_token_seen = True
        if self.continuous_usage:
            return data
        if not choices:  # the final usage-only chunk
            return data if self.include_usage else None
        if self.include_usage:
            chunk["usage"] = None
        else:
            chunk.pop("usage", None)
        return json.dumps(chunk, separators=(",", ":"))


def _has_output(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta")
    if delta is not None:
        return bool(delta.get("content") or delta.get("tool_calls") or delta.get("reasoning"))
    return bool(choice.get("text"))
