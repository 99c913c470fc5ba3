"""The ingress's own count of the completion it delivered (serve_app.recount), with the local
tiny model's real tokenizer (`cluster.local_model`, made here) and vLLM's request models:
what the client was sent is counted, the engine's report is believed only below that, and
the text that ends a choice (EOS, a stop string the request asked for) counts as generated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from transformers import AutoTokenizer

from cluster.local_model import ensure_local_model
from serve_app.recount import (
    Delivered,
    Ending,
    RunningCount,
    billed,
    echoed_prompts,
)
from serve_app.streaming import SSERelay
from serve_app.tokens import PromptCounter

STORY = "Tell me a story about a small robot. The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_local_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def counter(model_dir: Path) -> PromptCounter:
    return PromptCounter(str(model_dir), 2048)


@pytest.fixture(scope="module")
def tokens(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def chunk(index: int, content: str | None = None, finish=None, stop_reason=None) -> dict:
    choice = {"index": index, "delta": {"content": content} if content else {}}
    if finish:
        choice.update(finish_reason=finish, stop_reason=stop_reason)
    return {"choices": [choice]}


def test_billed_is_never_more_than_either_count() -> None:
    assert billed(10, 50) == 10  # an engine that over-reports is paid what was delivered
    assert billed(50, 10) == 10  # one that under-reports is taken at its word
    assert billed(-3, 10) == 0


def test_a_chat_stream_is_counted_per_choice_with_what_ended_it(counter, tokens) -> None:
    """n=2: each choice's text, and its EOS (finish_reason stop, no stop_reason: generated,
    reported, never in the text); a choice cut by `length` has no terminator."""
    delivered = Delivered()
    words = STORY.split(" ")
    for i, word in enumerate(words):
        delivered.add_chunk(chunk(0, word + " "))
        if i % 2 == 0:
            delivered.add_chunk(chunk(1, word))
    delivered.add_chunk(chunk(0, finish="stop"))
    delivered.add_chunk(chunk(1, finish="length"))
    first = "".join(w + " " for w in words)
    second = "".join(words[::2])
    assert delivered.texts() == [first, second]
    assert delivered.count(counter.texts) == tokens(first) + 1 + tokens(second)


def test_a_stop_string_counts_only_when_the_request_asked_for_it(counter, tokens) -> None:
    """vLLM names the stop string that ended a choice (`stop_reason`); it was generated but is
    not in the text. An engine naming a string the request never gave gets nothing for it."""
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["THE END"]}
    )
    asked = Delivered(Ending.of(request))
    asked.add_chunk(chunk(0, "Once upon a time"))
    asked.add_chunk(chunk(0, finish="stop", stop_reason="THE END"))
    assert asked.count(counter.texts) == tokens("Once upon a time") + tokens("THE END")
    made_up = Delivered(Ending.of(request))
    made_up.add_chunk(chunk(0, "Once upon a time"))
    made_up.add_chunk(chunk(0, finish="stop", stop_reason="x" * 5000))
    assert made_up.count(counter.texts) == tokens("Once upon a time")
    # kept in the text (`include_stop_str_in_output`): counted there, once
    kept = Delivered(Ending(("THE END",), stop_in_text=True))
    kept.add_chunk(chunk(0, "Once THE END"))
    kept.add_chunk(chunk(0, finish="stop", stop_reason="THE END"))
    assert kept.count(counter.texts) == tokens("Once THE END")


def test_a_whole_answer_counts_content_reasoning_and_tool_calls(counter, tokens) -> None:
    arguments = json.dumps({"city": "Paris"})
    payload = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "content": "It is sunny.",
                    "reasoning_content": "The user asks about weather.",
                    "tool_calls": [{"function": {"name": "get_weather", "arguments": arguments}}],
                },
                "finish_reason": "tool_calls",
            }
        ]
    }
    delivered = Delivered()
    delivered.add_response(payload)
    text = "It is sunny." + "The user asks about weather." + "get_weather" + arguments
    assert delivered.count(counter.texts) == tokens(text) + 1


def test_an_echoed_prompt_is_not_counted_as_completion(counter, tokens) -> None:
    """`echo`: each choice's text begins with its prompt (choices numbered prompt by prompt,
    n each); only what follows was generated."""
    request = CompletionRequest.model_validate(
        {"model": "m", "prompt": ["Hello", "The quick"], "echo": True, "n": 2}
    )
    echoed = echoed_prompts(request, 2)
    assert echoed == {0: "Hello", 1: "Hello", 2: "The quick", 3: "The quick"}
    delivered = Delivered(Ending.of(request), echoed)
    for index, prompt in echoed.items():
        delivered.add_response({"choices": [{"index": index, "text": prompt + " robot dog"}]})
    assert delivered.count(counter.texts) == 4 * tokens(" robot dog")
    not_echoing = CompletionRequest.model_validate({"model": "m", "prompt": "Hello"})
    assert echoed_prompts(not_echoing, 1) == {}


def test_a_running_count_takes_each_piece_once(counter, tokens) -> None:
    """Checkpoints count only the text delivered since the previous one: the stream is
    tokenized about once, and the running total stays within a token or two per split of
    the whole text's count (here split mid-word, every 7 characters: the worst case)."""
    delivered = Delivered()
    running = RunningCount(delivered, counter.texts)
    words = (STORY + " ") * 5
    splits = 0
    for i in range(0, len(words), 7):
        delivered.add_chunk(chunk(0, words[i : i + 7]))
        if i % 70 == 0:
            texts = running.pending()  # the text delivered since the last count, once
            assert texts and running.pending() == []
            running.add(texts)
            splits += 1
        if i % 70 == 35:
            running.total()
            splits += 1
            assert running.pending() == []
    total = running.total()
    whole = tokens(words)
    assert whole <= total <= whole + 2 * splits
    assert delivered.count(counter.texts) == whole


def test_a_patched_engines_final_usage_is_told_as_delivered(counter, tokens) -> None:
    """An engine that reports the most completion tokens the reservation allows: the final
    usage chunk the client gets (and the usage settled) says what was delivered, and the
    engine's figure rides beside it for the meter."""
    delivered = Delivered()
    relay = SSERelay.for_options(
        {"include_usage": True}, delivered=delivered, running=RunningCount(delivered, counter.texts)
    )
    text = ""
    for word in STORY.split(" ")[:6]:
        usage = {"prompt_tokens": 5, "completion_tokens": 200, "total_tokens": 205}
        relay.relay(sse({**chunk(0, word + " "), "usage": usage}))
        text += word + " "
    relay.relay(sse({**chunk(0, finish="length"), "usage": usage}))
    out = relay.relay(sse({"choices": [], "usage": usage}) + "data: [DONE]\n\n")
    told = json.loads(out.split("\n\n")[0].removeprefix("data: "))
    assert told["usage"]["completion_tokens"] == tokens(text) < 200
    assert told["usage"]["total_tokens"] == 5 + tokens(text)
    assert relay.billed is not None
    assert (relay.billed.completion_tokens, relay.billed.reported_completion_tokens) == (
        tokens(text),
        200,
    )


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
