import pytest

from cluster.catalog import load_catalog
from cluster.settings import CONFIGS_DIR
from serve_app.errors import APIError
from serve_app.schemas import decode_json, parse_chat, parse_completion, require_model

MODEL = load_catalog(CONFIGS_DIR / "models.toml").get("darkgpu-tiny")
MSG = [{"role": "user", "content": "hi"}]


def refused(fn, *args) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args)
    assert info.value.status == 400 and info.value.type == "invalid_request"
    return info.value


@pytest.mark.parametrize("raw", [b"{bad", b"[1, 2]", b"\xff", b""])
def test_body_must_be_a_json_object(raw):
    refused(decode_json, raw)


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
