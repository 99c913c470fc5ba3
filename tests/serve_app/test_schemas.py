import pytest

from cluster.catalog import load_catalog
from core.settings import CONFIGS_DIR
from kernel.errors import DarkGpuError
from serve_app.schemas import decode_json, parse_chat, parse_completion, require_model

MODEL = load_catalog(CONFIGS_DIR / "models.toml").get("darkgpu-tiny")
MSG = [{"role": "user", "content": "hi"}]


def refused(fn, *args) -> DarkGpuError:
    with pytest.raises(DarkGpuError) as info:
        fn(*args)
    assert info.value.status == 400 and info.value.type == "invalid_request"
    return info.value


@pytest.mark.parametrize("raw", [b"{bad", b"[1, 2]", b"\xff", b""])
def test_body_must_be_a_json_object(raw):
    refused(decode_json, raw)


def test_deeply_nested_json_is_a_400_not_a_500():
    deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "nested too deeply" in refused(decode_json, deep).message


def test_model_is_required_and_a_string():
    assert refused(require_model, {}).param == "model"
    assert refused(require_model, {"model": 3}).param == "model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
        ({"messages": MSG, "max_tokens": "8"}, "max_tokens"),
        ({"messages": MSG, "max_completion_tokens": 257}, "max_completion_tokens"),
        ({"messages": MSG, "temperature": "hot"}, "temperature"),
        ({"messages": MSG, "stream": "yes"}, "stream"),
        ({"messages": MSG, "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_chat_refusals_name_the_parameter(body, param):
    error = refused(parse_chat, {"model": MODEL.id, **body}, MODEL, "req_1")
    assert error.param == param


def test_past_the_context_is_its_own_code():
    error = refused(
        parse_chat, {"model": MODEL.id, "messages": MSG, "max_tokens": 10**6}, MODEL, "req_1"
    )
    assert error.code == "context_length_exceeded"


def test_streams_always_ask_the_engine_for_usage_and_carry_our_request_id():
    request = parse_chat({"model": MODEL.id, "messages": MSG, "stream": True}, MODEL, "req_9")
    assert request.request_id == "req_9"
    assert request.stream_options.include_usage and request.stream_options.continuous_usage_stats
    plain = parse_chat({"model": MODEL.id, "messages": MSG}, MODEL, "req_8")
    assert plain.stream_options is None and plain.request_id == "req_8"


def test_completion_needs_a_prompt():
    assert refused(parse_completion, {"model": MODEL.id}, MODEL, "r").param == "prompt"
    empty = {"model": MODEL.id, "prompt": ""}
    assert refused(parse_completion, empty, MODEL, "r").param == "prompt"
    ok = parse_completion({"model": MODEL.id, "prompt": "Once", "max_tokens": 4}, MODEL, "r")
    assert ok.max_tokens == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ["a"] * 65}, "prompt"),  # more prompts than MAX_PROMPTS
        ({"prompt": [[1, 2]] * 65}, "prompt"),
        ({"prompt": "a", "n": 17}, "n"),
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": "a", "n": "2"}, "n"),
        ({"prompt": ["a"] * 8, "n": 16}, "prompt"),  # 128 completions
        ({"prompt": "a", "n": 2, "best_of": 3}, "best_of"),
        ({"prompt": "a", "use_beam_search": True}, "use_beam_search"),
        ({"prompt": "a", "suffix": "b"}, "suffix"),
        ({"prompt": "a", "prompt_embeds": "AAAA"}, "prompt_embeds"),
    ],
)
def test_completion_multipliers_are_bounded_or_refused(body, param):
    error = refused(parse_completion, {"model": MODEL.id, **body}, MODEL, "r")
    assert error.param == param and param in error.message


def test_chat_multipliers_are_bounded_or_refused():
    chat = {"model": MODEL.id, "messages": MSG}
    assert refused(parse_chat, {**chat, "n": 17}, MODEL, "r").param == "n"
    assert refused(parse_chat, {**chat, "chat_template": "{{ 1 }}"}, MODEL, "r").param == (
        "chat_template"
    )
    assert parse_chat({**chat, "n": 4}, MODEL, "r").n == 4
    many = parse_completion({"model": MODEL.id, "prompt": ["a"] * 64, "echo": True}, MODEL, "r")
    assert len(many.prompt) == 64 and many.echo


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("parse", "body", "param"),
    [
        # vLLM's own request checks raise its VLLMValidationError, which pydantic does not
        # wrap: each of these was a 500 (found by tests/serve_app/test_hostile_generated.py)
        (
            parse_chat,
            {"messages": MSG, "tools": [TOOL], "tool_choice": {"type": "function",
                                                              "function": {"name": "nothing"}}},
            "tool_choice",
        ),
        (parse_completion, {"prompt": "a", "logprobs": -2}, "logprobs"),
        (parse_completion, {"prompt": "a", "response_format": {"type": "json_schema"}},
         "response_format"),
    ],
)  # fmt: skip
def test_the_engines_own_request_checks_are_400s_naming_the_parameter(parse, body, param):
    error = refused(parse, {"model": MODEL.id, **body}, MODEL, "r")
    assert error.param == param, error.message


def test_a_stream_echoing_logprobs_of_several_choices_is_refused():
    """vLLM 0.32's completion stream fails mid-stream (a KeyError: an in-stream 500) when it
    echoes the prompt with logprobs for n > 1 choices (found by test_hostile_generated)."""
    shape = {"model": MODEL.id, "prompt": "{", "stream": True, "echo": True, "logprobs": 0}
    error = refused(parse_completion, {**shape, "n": 2}, MODEL, "r")
    assert error.param == "logprobs" and "echo" in error.message
    for fine in ({"n": 1}, {"n": 2, "stream": False}, {"n": 2, "echo": False},
                 {"n": 2, "logprobs": None}):  # fmt: skip
        assert parse_completion({**shape, **fine}, MODEL, "r").request_id == "r"


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "image_url", "image_url": {}}],  # no url
        [{"type": "wizard"}],
        [5],
    ],
)
def test_content_parts_vllm_cannot_read_are_400s_not_unpicklable_requests(content):
    """vLLM's message types take content parts as an `Iterable`: a part none of them reads
    stayed a lazy pydantic iterator, which Ray cannot pickle to the model replica (a 500,
    found by test_hostile_generated); now every part is read here, and a bad one refused."""
    body = {"model": MODEL.id, "messages": [{"role": "user", "content": content}]}
    assert refused(parse_chat, body, MODEL, "r").param == "messages[0].content"
