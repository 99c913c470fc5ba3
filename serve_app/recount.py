"""The completion a response delivered, counted by the ingress itself: the metering authority.

The engine runs on the provider's machine, and the provider is paid for the completion tokens
it reports: a patched engine could report the most the reservation allows. So the ingress
keeps the text it actually handed to the client, per choice (`Delivered`), counts it with the
model's own tokenizer (`tokens.PromptCounter.texts`) and bills the least of its count and the
engine's report (`billed`); the usage event keeps both (kernel.usage_event), and the meter
records a strike against a provider whose report exceeds the count beyond a tolerance
(billing.strikes).

What the count covers, per choice: the text (`content`, `reasoning_content`/`reasoning`, a
tool call's name and arguments; a completion's `text`, less the prompt it echoes), plus the
tokens that ended it, which the client sees only as `finish_reason`/`stop_reason`: the EOS or
stop token (one token) and a matched stop string (its tokens; only one the request asked
for, so an engine cannot name a long one). Detokenizing then retokenizing is not exact (the
engine may emit a split the tokenizer would merge, a token inside a UTF-8 character, a
special token the text skips): the count can fall a few tokens short of an honest engine's
report, or exceed it; billing takes the lesser, the strike tolerance absorbs the rest.

Cost: a stream's text is kept as it is relayed (appending strings per chunk) and counted
once, at its end. A checkpoint (serve_app.holds) counts only the text delivered since the
previous one (`take_new`), so a stream is tokenized about once in all; each split can make
the running count exceed the whole text's by a token or two (a word cut in two), and the
least of it and the engine's report is billed.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The EOS or stop token that ended a choice: generated and reported, never in the text.
TERMINATOR_TOKENS = 1

Count = Callable[[Sequence[str]], list[int]]


def billed(counted: int, reported: int) -> int:
    """What the request is billed for its completion: the ingress's count, never more than
    the engine reported (an engine that under-reports is taken at its word)."""
    return max(0, min(counted, reported))


@dataclass
class _Choice:
    pieces: list[str] = field(default_factory=list)
    size: int = 0  # characters in `pieces`
    counted_upto: int = 0  # characters already counted by `take_new`
    finish_reason: str | None = None
    stop_reason: Any = None

    def add(self, text: Any) -> None:
        if isinstance(text, str) and text:
            self.pieces.append(text)
            self.size += len(text)

    def text(self) -> str:
        if len(self.pieces) > 1:
            self.pieces = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""


@dataclass(frozen=True)
class Ending:
    """How a request lets its choices end: its stop strings, and whether they are kept in
    the text (`include_stop_str_in_output`)."""

    stop: tuple[str, ...] = ()
    stop_in_text: bool = False

    @classmethod
    def of(cls, request: Any) -> Ending:
        stop = getattr(request, "stop", None)
        strings = (stop,) if isinstance(stop, str) else tuple(s for s in stop or () if s)
        return cls(strings, bool(getattr(request, "include_stop_str_in_output", False)))


class Delivered:
    """The text one response delivered to its client, per choice index.

    `echoed`: for a completion that echoes its prompt, each choice's prompt text (by choice
    index): not generated, so not counted."""

    def __init__(self, ending: Ending | None = None, echoed: Mapping[int, str] | None = None):
        self._ending = ending or Ending()
        self._echoed = dict(echoed or {})
        self._choices: dict[int, _Choice] = {}

    def _choice(self, raw: Mapping[str, Any]) -> _Choice:
        index = raw.get("index") or 0
        index = index if isinstance(index, int) and not isinstance(index, bool) else 0
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = _Choice()
        if raw.get("finish_reason"):
            choice.finish_reason = str(raw["finish_reason"])
            choice.stop_reason = raw.get("stop_reason")
        return choice

    def add_chunk(self, chunk: Mapping[str, Any]) -> None:
        """One stream chunk as it was relayed (chat `delta`s or completion `text`)."""
        for raw in _dicts(chunk.get("choices")):
            choice = self._choice(raw)
            delta = raw.get("delta")
            if isinstance(delta, Mapping):
                _add_message(choice, delta)
            else:
                choice.add(raw.get("text"))

    def add_response(self, payload: Mapping[str, Any]) -> None:
        """A whole (non-streamed) response: chat `message`s or completion `text`s."""
        for raw in _dicts(payload.get("choices")):
            choice = self._choice(raw)
            message = raw.get("message")
            if isinstance(message, Mapping):
                _add_message(choice, message)
            else:
                choice.add(raw.get("text"))

    def _start(self, index: int, choice: _Choice) -> int | None:
        """Where the generated text starts in the choice's text (after its echoed prompt);
        None while the echo is not complete yet."""
        prompt = self._echoed.get(index)
        if not prompt:
            return 0
        text = choice.text()
        if text.startswith(prompt):
            return len(prompt)
        if prompt.startswith(text):
            return None  # the echo is still arriving
        return 0  # not the prompt as given (e.g. token ids, decoded): counted whole

    def texts(self) -> list[str]:
        """Each choice's generated text, delivered so far."""
        out = []
        for index, choice in sorted(self._choices.items()):
            start = self._start(index, choice)
            out.append("" if start is None else choice.text()[start:])
        return out

    def take_new(self) -> list[str]:
        """The text delivered since the last call, per choice (for a running count)."""
        out = []
        for index, choice in sorted(self._choices.items()):
            start = self._start(index, choice)
            if start is None:
                continue
            begin = max(start, choice.counted_upto)
            if choice.size > begin:
                out.append(choice.text()[begin:])
                choice.counted_upto = choice.size
        return out

    def endings(self) -> tuple[int, list[str]]:
        """The tokens that ended the choices beyond their text: how many terminator tokens,
        and the stop strings matched (to count with the tokenizer)."""
        terminators, strings = 0, []
        for choice in self._choices.values():
            if choice.finish_reason not in ("stop", "tool_calls"):
                continue  # `length`, an abort or an error: nothing past the text
            reason = choice.stop_reason
            if isinstance(reason, str):
                if reason in self._ending.stop and not self._ending.stop_in_text:
                    strings.append(reason)
            else:  # None: EOS; an int: a stop token id
                terminators += TERMINATOR_TOKENS
        return terminators, strings

    def count(self, count: Count) -> int:
        """The completion tokens delivered: every choice's text and what ended it."""
        terminators, strings = self.endings()
        texts = self.texts()
        return sum(count([*texts, *strings])) + terminators

    @property
    def size(self) -> int:
        """Characters delivered (to decide whether counting is worth a thread)."""
        return sum(c.size for c in self._choices.values())


class RunningCount:
    """A stream's count so far: each call counts only what was delivered since the previous
    one, so a stream is tokenized about once in all, whether its checkpoints, its final
    usage chunk or its settlement asks. Pieces are counted apart: a split between two calls
    can count a token or two more than the whole text would (never more than the engine
    reported is billed)."""

    def __init__(self, delivered: Delivered, count: Count) -> None:
        self._delivered = delivered
        self._count = count
        self._lock = threading.Lock()  # `add` runs in a thread for long pieces
        self.tokens = 0

    def pending(self) -> list[str]:
        """The text to count now (call on the event loop: it reads the relay's state)."""
        return self._delivered.take_new()

    def add(self, texts: list[str]) -> int:
        """Count `texts` into the total; returns the total with the endings seen so far."""
        counted = sum(self._count(texts)) if texts else 0
        terminators, strings = self._delivered.endings()
        ended = sum(self._count(strings)) if strings else 0
        with self._lock:
            self.tokens += counted
            return self.tokens + terminators + ended

    def total(self) -> int:
        """Count what is pending now, here (it is what arrived since the last checkpoint)."""
        return self.add(self.pending())


def echoed_prompts(request: Any, n: int) -> dict[int, str]:
    """A completion request that echoes: each choice's prompt text, by choice index (choices
    are numbered prompt by prompt, `n` each). Empty where nothing is echoed."""
    if not getattr(request, "echo", False):
        return {}
    prompt = getattr(request, "prompt", None)
    prompts: Iterable[Any] = prompt if isinstance(prompt, list) else [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return {}  # one prompt of token ids: its echo is decoded by the engine
    out = {}
    for i, text in enumerate(prompts):
        if isinstance(text, str):
            for j in range(max(1, n)):
                out[i * max(1, n) + j] = text
    return out


def _dicts(value: Any) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _add_message(choice: _Choice, message: Mapping[str, Any]) -> None:
    """A chat message or delta: its content, reasoning and tool calls."""
    choice.add(message.get("content"))
    choice.add(message.get("reasoning_content") or message.get("reasoning"))
    for call in _dicts(message.get("tool_calls")):
        function = call.get("function")
        if isinstance(function, Mapping):
            choice.add(function.get("name"))
            arguments = function.get("arguments")
            choice.add(arguments if isinstance(arguments, str) else _json(arguments))


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)
