"""Prompt tokens counted at the ingress, before inference, to reserve against caps and credits.

Each deployed model's own tokenizer and chat template give the count the engine will bill:

- chat: the prompt vLLM renders, with vLLM's own renderer (`safe_apply_chat_template`, the
  function its chat serving calls) and the same arguments its chat serving builds from the
  request: `tools`, `documents`, `chat_template_kwargs`, `add_generation_prompt`,
  `continue_final_message`, `reasoning_effort` (`ChatCompletionRequest.build_chat_params`).
- completions: one count per prompt of a prompt list (text, or token ids), each as the engine
  tokenizes it (special tokens added unless the request says not to), each capped at the
  context (a longer prompt is refused by the engine).

Where the tokenizer cannot give the count (content parts other than text, a tokenizer that
fails to load), the UTF-8 byte length of everything the template could render stands in:
byte-level BPE never makes more tokens than bytes, so the reservation stays an upper bound
for the request's own text. Settlement bills what the engine reports, never this count.

`texts` counts the completion a response delivered with the same tokenizer
(`serve_app.recount`): the ingress bills that count, never more than the engine reported.

Templating and tokenizing are CPU-bound: the ingress runs these methods in a thread. One
lock per counter serializes them: a Rust tokenizer shared by threads can fail with "Already
borrowed" when one call changes its truncation or padding while another encodes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

logger = logging.getLogger("darkgpu.ingress")


class PromptCounter:
    def __init__(self, source: str, context_length: int) -> None:
        self._source = source
        self._context_length = context_length
        self._tokenizer: Any = None
        self._loaded = False
        self._lock = threading.Lock()
        # What vLLM's renderer reads of the model's config: only where a request brings
        # no tools and the tokenizer folder holds a processor with its own chat template.
        self._model_config = SimpleNamespace(
            model=source,
            tokenizer=source,
            tokenizer_revision=None,
            code_revision=None,
            trust_remote_code=False,
        )

    def _load(self) -> Any:
        """The tokenizer; called with the lock held."""
        if not self._loaded:
            self._loaded = True
            try:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self._source)
            except Exception as exc:  # no tokenizer: fall back to the byte bound
                logger.warning("no tokenizer for %s (%s); counting bytes", self._source, exc)
        return self._tokenizer

    def chat(self, request: Any) -> int:
        """The prompt tokens of a chat request (vLLM's `ChatCompletionRequest`)."""
        tool_dicts = [tool.model_dump() for tool in request.tools] if request.tools else None
        params = request.build_chat_params(None, "auto").with_defaults({"tools": tool_dicts})
        kwargs = params.get_apply_chat_template_kwargs()
        conversation = _conversation(request.messages)
        with self._lock:
            return self._chat(request, kwargs, conversation)

    def _chat(
        self, request: Any, kwargs: dict[str, Any], conversation: list[dict[str, Any]] | None
    ) -> int:
        tokenizer = self._load()
        if tokenizer is not None and conversation is not None:
            from vllm.renderers.hf import safe_apply_chat_template

            render: Any = safe_apply_chat_template  # its model_config: ours is a stand-in
            try:
                ids = render(
                    self._model_config,
                    tokenizer,
                    conversation,
                    tokenize=True,
                    **kwargs,
                )
                return self._bounded(len(ids))
            except Exception as exc:  # the engine refuses it the same way; bound it anyway
                logger.info("chat template failed at the ingress (%s); counting bytes", exc)
        rendered = {k: v for k, v in kwargs.items() if k != "chat_template"}
        text = json.dumps([request.messages, rendered], ensure_ascii=False, default=str)
        template = getattr(tokenizer, "chat_template", None) or ""
        return self._bounded(len(text.encode()) + len(str(template).encode()))

    def completion(self, request: Any) -> list[int]:
        """The prompt tokens of each prompt of a completion request (vLLM's
        `CompletionRequest`), in order, each capped at the context."""
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [self._bounded(len(prompt))]
        prompts = prompt if isinstance(prompt, list) else [prompt]
        special = getattr(request, "add_special_tokens", True) is not False
        with self._lock:
            return self._completion(prompts, special)

    def _completion(self, prompts: list[Any], special: bool) -> list[int]:
        tokenizer = self._load()
        counts = []
        for text in prompts:
            if isinstance(text, list):  # a list of token ids
                counts.append(self._bounded(len(text)))
            elif tokenizer is not None:
                ids = tokenizer.encode(str(text), add_special_tokens=special)
                counts.append(self._bounded(len(ids)))
            else:
                counts.append(self._bounded(len(str(text).encode()) + 2))
        return counts

    def texts(self, texts: Sequence[str]) -> list[int]:
        """The tokens of each text as the model's tokenizer splits it, no special tokens added:
        how the ingress counts a completion it delivered (`serve_app.recount`). Without a
        tokenizer, UTF-8 bytes: an upper bound for byte-level BPE, so billing (the least of
        this and the engine's report) falls back to the engine's report."""
        if not any(texts):
            return [0] * len(texts)
        with self._lock:
            tokenizer = self._load()
            if tokenizer is None:
                return [len(text.encode()) for text in texts]
            encoded = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)[
                "input_ids"
            ]
        return [len(ids) for ids in encoded]

    def _bounded(self, count: int) -> int:
        """A prompt past the context is refused by the engine: never reserve beyond it."""
        return max(1, min(count, self._context_length))


def _conversation(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The messages as vLLM's renderer gets them for a text model (text parts joined with
    newlines, its "string" content format), or None where a part is not text."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    return None
                texts.append(str(part.get("text", "")))
            message = {**message, "content": "\n".join(texts)}
        out.append(dict(message))
    return out
