import json

from serve_app.streaming import SSERelay


def chunk(content=None, usage=None, final=False):
    body = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [] if final else [{"index": 0, "delta": {"content": content}}],
    }
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def usage(p, c):
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


ENGINE = [
    chunk("", usage(5, 0)),
    chunk("He", usage(5, 1)),
    chunk("llo", usage(5, 2)),
    chunk(final=True, usage=usage(5, 2)),
    "data: [DONE]\n\n",
]


def events(text):
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e]


def run(relay):
    out = []
    for item in ENGINE:
        out += events(relay.relay(item))
    return out


def test_without_include_usage_the_client_sees_no_usage_but_we_do():
    relay = SSERelay(include_usage=False, continuous_usage=False)
    out = run(relay)
    assert out[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in out[:-1])
    assert len(out) == 4  # the usage-only chunk is dropped
    assert (relay.usage.prompt_tokens, relay.usage.completion_tokens) == (5, 2)
    assert relay.first_token_seen and relay.done


def test_include_usage_gives_openais_final_usage_chunk():
    out = run(SSERelay(include_usage=True, continuous_usage=False))
    parsed = [json.loads(e) for e in out[:-1]]
    assert all(p["usage"] is None for p in parsed[:-1])
    assert parsed[-1]["choices"] == [] and parsed[-1]["usage"]["completion_tokens"] == 2


def test_continuous_usage_passes_through():
    out = run(SSERelay(include_usage=False, continuous_usage=True))
    assert [json.loads(e)["usage"]["completion_tokens"] for e in out[:-1]] == [0, 1, 2, 2]


def test_usage_so_far_is_known_when_the_stream_stops_early():
    relay = SSERelay(include_usage=False, continuous_usage=False)
    for item in ENGINE[:2]:
        relay.relay(item)
    assert relay.usage.completion_tokens == 1 and not relay.done


def test_errors_in_the_stream_are_kept():
    relay = SSERelay(include_usage=False, continuous_usage=False)
    out = relay.relay('data: {"error": {"message": "boom", "type": "x", "code": 500}}\n\n')
    assert relay.error["message"] == "boom" and "boom" in out
