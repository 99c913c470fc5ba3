"""The ingress counts the prompt tokens the engine will bill: every prompt of a list, and for
chat everything vLLM renders into the prompt (tools, documents, template arguments).

With the local tiny model's real tokenizer (`cluster.local_model`, made here), and vLLM's own
request models; the expected counts are the tokenizer's own, computed here directly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from transformers import AutoTokenizer

from cluster.local_model import ensure_local_model
from serve_app.tokens import PromptCounter

CONTEXT = 2048
MSG = [{"role": "user", "content": "hi"}]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city, today and for the next seven days.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
# A template that renders what real models' templates render: tools, documents, and an
# argument of the request's chat_template_kwargs.
TEMPLATE = (
    "{% if tools %}<|system|>\n{{ tools | tojson }}<|end|>\n{% endif %}"
    "{% for d in documents or [] %}<|system|>\n{{ d['title'] }}: {{ d['text'] }}<|end|>\n"
    "{% endfor %}"
    "{% if persona %}<|system|>\n{{ persona }}<|end|>\n{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if not (loop.last and continue_final_message) %}<|end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_local_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tools_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's tokenizer with a template that renders tools and documents."""
    folder = tmp_path_factory.mktemp("tools") / "tok"
    shutil.copytree(model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def rendered(tokenizer, messages, **kwargs) -> int:
    """What the tokenizer itself makes of the messages: the expected count."""
    return len(tokenizer.apply_chat_template(messages, return_dict=False, **kwargs))


def chat(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **body})


def completion(**body) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", **body})


def test_each_prompt_of_a_list_is_counted(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    counter = PromptCounter(str(model_dir), CONTEXT)
    one = len(tokenizer.encode("Once upon a time"))
    assert counter.completion(completion(prompt="Once upon a time")) == [one]
    assert counter.completion(completion(prompt=["Once upon a time"] * 4)) == [one] * 4
    assert counter.completion(completion(prompt=[[1, 2, 3], [4, 5], [6]])) == [3, 2, 1]
    assert counter.completion(completion(prompt=[7, 8, 9, 10])) == [4]
    bare = counter.completion(completion(prompt="Once upon a time", add_special_tokens=False))
    assert bare == [len(tokenizer.encode("Once upon a time", add_special_tokens=False))]


def test_each_prompt_is_capped_at_the_context_on_its_own(model_dir: Path) -> None:
    counter = PromptCounter(str(model_dir), 100)
    assert counter.completion(completion(prompt=[[1] * 150, [1] * 150, [2] * 7])) == [100, 100, 7]


def test_chat_counts_what_the_engine_renders(tools_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tools_model)
    counter = PromptCounter(str(tools_model), CONTEXT)
    plain = counter.chat(chat())
    assert plain == rendered(tokenizer, MSG, add_generation_prompt=True)
    with_tools = counter.chat(chat(tools=[TOOL]))
    assert with_tools == rendered(tokenizer, MSG, tools=[TOOL], add_generation_prompt=True)
    assert with_tools > plain + 20
    docs = [{"title": "Manual", "text": "Press the red button twice to start the engine."}]
    assert counter.chat(chat(documents=docs)) == rendered(
        tokenizer, MSG, documents=docs, add_generation_prompt=True
    )
    persona = "You are a patient librarian who answers in full sentences."
    assert counter.chat(chat(chat_template_kwargs={"persona": persona})) == rendered(
        tokenizer, MSG, persona=persona, add_generation_prompt=True
    )
    assert counter.chat(chat(add_generation_prompt=False)) == rendered(
        tokenizer, MSG, add_generation_prompt=False
    )
    final = [*MSG, {"role": "assistant", "content": "Hello"}]
    assert counter.chat(
        chat(messages=final, add_generation_prompt=False, continue_final_message=True)
    ) == rendered(tokenizer, final, continue_final_message=True)


def test_text_parts_are_counted_as_the_engine_joins_them(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    counter = PromptCounter(str(model_dir), CONTEXT)
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    joined = [{"role": "user", "content": "Hello\nthere"}]
    assert counter.chat(chat(messages=[{"role": "user", "content": parts}])) == rendered(
        tokenizer, joined, add_generation_prompt=True
    )
