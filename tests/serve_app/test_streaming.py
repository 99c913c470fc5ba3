import asyncio
import json

from serve_app.recount import Delivered, RunningCount
from serve_app.streaming import ClosingStream, SSERelay, Usage


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


def test_errors_in_the_stream_are_told_in_the_spec_shape():
    """vLLM's own errors mid-stream (`"type": "BadRequestError"`, a numeric code) reached
    clients as they were; a 5xx's message may hold the engine's internals."""
    relay = SSERelay(include_usage=False, continuous_usage=False)
    out = relay.relay('data: {"error": {"message": "boom at 0x7f", "type": "InternalServerError",'
                      ' "code": 500}}\n\n')  # fmt: skip
    told = json.loads(events(out)[0])["error"]
    assert told["type"] == "internal_error" and "boom" not in out and relay.error == told
    relay = SSERelay(include_usage=False, continuous_usage=False)
    out = relay.relay('data: {"error": {"message": "bad stop", "type": "BadRequestError",'
                      ' "param": "stop", "code": 400}}\n\n')  # fmt: skip
    told = json.loads(events(out)[0])["error"]
    assert (told["type"], told["message"], told["param"]) == ("invalid_request", "bad stop", "stop")
    odd = SSERelay(include_usage=False, continuous_usage=False)
    odd.relay('data: {"error": "nope"}\n\n')
    assert odd.error is not None and odd.error["type"] == "internal_error"


async def test_a_stream_the_client_left_before_its_first_byte_still_closes() -> None:
    """Starlette cancels such a response before it starts its body (so the body's own
    `finally` never runs); `on_close` runs all the same, once."""
    started, closed = [], []

    async def body():
        started.append(1)
        yield "data: x\n\n"

    async def gone() -> dict:
        return {"type": "http.disconnect"}

    async def slow_send(message: dict) -> None:
        await asyncio.sleep(10)  # the start of the response never gets out

    response = ClosingStream(body(), on_close=lambda: closed.append(1))
    await response({"type": "http", "asgi": {"spec_version": "2.3"}}, gone, slow_send)
    assert started == [] and closed == [1]

    sent: list[dict] = []

    async def never() -> dict:
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    served = ClosingStream(body(), on_close=lambda: closed.append(2))
    await served({"type": "http", "asgi": {"spec_version": "2.3"}}, never, send)
    assert started == [1] and closed == [1, 2]
    assert [m.get("body") for m in sent[1:]] == [b"data: x\n\n", b""]


def choice_chunk(index, text, usage=None):
    body = {"id": "c", "object": "text_completion", "model": "m",
            "choices": [{"index": index, "text": text}]}  # fmt: skip
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def test_usage_so_far_sums_every_choice_of_every_prompt():
    """Continuous usage is per choice (vLLM: a prompt list, n > 1): a stream that stops
    early is billed every choice's tokens so far, each prompt once, not the last chunk's."""
    relay = SSERelay(include_usage=False, continuous_usage=False, n=2)
    # two prompts (7 and 5 tokens) x n=2: choices 0, 1 of the first, 2, 3 of the second
    for index, prompt, done in ((0, 7, 1), (1, 7, 1), (2, 5, 1), (3, 5, 1), (0, 7, 2), (2, 5, 2)):
        relay.relay(choice_chunk(index, "x", usage(prompt, done)))
    assert (relay.usage.prompt_tokens, relay.usage.completion_tokens) == (7 + 5, 2 + 1 + 2 + 1)
    relay.relay(chunk(final=True, usage=usage(12, 40)))  # the engine's total, when it comes
    assert (relay.usage.prompt_tokens, relay.usage.completion_tokens) == (12, 40)


def test_an_engine_claiming_a_longer_prompt_is_held_to_the_ingress_count():
    """The ingress counted the prompt before inference (as the engine renders it) and
    reserved that; an engine reporting more, on every chunk and in its final usage, is
    billed and told the ingress's count."""
    running = RunningCount(delivered := Delivered(), lambda texts: [len(t) for t in texts])
    relay = SSERelay(
        include_usage=True, continuous_usage=False, delivered=delivered, running=running,
        prompt_cap=12,
    )  # fmt: skip
    relay.relay(choice_chunk(0, "abc", usage(900, 1)))
    assert relay.usage.prompt_tokens == 12
    out = relay.relay(chunk(final=True, usage=usage(900, 3)))
    told = json.loads(out.removeprefix("data: "))["usage"]
    assert (told["prompt_tokens"], told["completion_tokens"], told["total_tokens"]) == (12, 3, 15)
    assert relay.billed is not None and relay.billed.prompt_tokens == 12
    assert Usage(900, 3).capped(12) == Usage(12, 3) and Usage(7, 3).capped(12) == Usage(7, 3)
