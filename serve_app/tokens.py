"""Prompt tokens counted at the ingress, before inference, to reserve against caps and credits.

Each deployed model's own tokenizer and chat template give the exact count for plain text;
where they cannot (content parts, a tokenizer that fails to load), the UTF-8 byte length of
the input stands in: byte-level BPE never makes more tokens than bytes, so the reservation
stays an upper bound. Settlement bills what the engine reports, never this count.
"""

from __future__ import annotations

import json
import logging
from typing import Any

logger = logging.getLogger("darkgpu.ingress")


class PromptCounter:
    def __init__(self, source: str, context_length: int) -> None:
        self._source = source
        self._context_length = context_length
        self._tokenizer: Any = None
        self._loaded = False

    def _load(self) -> Any:
        if not self._loaded:
            self._loaded = True
            try:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self._source)
            except Exception as exc:  # no tokenizer: fall back to the byte bound
                logger.warning("no tokenizer for %s (%s); counting bytes", self._source, exc)
        return self._tokenizer

    def chat(self, messages: list[dict[str, Any]]) -> int:
        tokenizer = self._load()
        if tokenizer is not None and all(isinstance(m.get("content"), str) for m in messages):
            try:
                text = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
                return self._bounded(len(tokenizer.encode(text, add_special_tokens=False)))
            except Exception:
                pass
        return self._bounded(len(json.dumps(messages, ensure_ascii=False).encode()))

    def completion(self, prompt: Any) -> int:
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return self._bounded(len(prompt))
        prompts = prompt if isinstance(prompt, list) else [prompt]
        tokenizer = self._load()
        total = 0
        for text in prompts:
            if isinstance(text, list):  # a list of token ids
                total += len(text)
            elif tokenizer is not None:
                total += len(tokenizer.encode(str(text)))
            else:
                total += len(str(text).encode()) + 1
        return self._bounded(total)

    def _bounded(self, count: int) -> int:
        """A prompt past the context is refused by the engine: never reserve beyond it."""
        return max(1, min(count, self._context_length))
