"""The ingress's client of a pool, against a real HTTP server that answers as a hostile pool
would: the pool's cluster holds providers' nodes, so whatever it says is parsed as untrusted,
and none of it may reach a client as anything but the engine's answer or a clean 503."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kernel.errors import DarkGpuError, InvalidRequest, Unavailable
from serve_app import pool_client
from serve_app.pool_admin import PoolAdmin
from serve_app.pool_client import NotTaken, PoolClient, Stalled
from serve_app.pool_protocol import (
    ANSWER_WITHIN_HEADER,
    ENGINE_ERROR_HEADER,
    MAX_LIST_BYTES,
    MODEL_HEADER,
    NOT_TAKEN_HEADER,
    SERVED_BY_HEADER,
    STALLED_HEADER,
    TAKE_WITHIN_HEADER,
    PoolListing,
    PoolReplica,
    ServedBy,
    credential_digest,
    credential_matches,
)
from tests.http_server import serving

TOKEN = "pool-secret"
SERVED = ServedBy("p1", "basic", "r1").header()
TEXT_EVENTS = 'data: {"text": "héllo wörld ✓ 🤖"}\n\ndata: [DONE]\n\n'
seen: list[dict[str, str]] = []


async def behave(request: Request) -> Response:
    """The pool's answer, as the request's model asks."""
    seen.append(dict(request.headers))
    if not credential_matches(request.headers.get("authorization"), credential_digest(TOKEN)):
        return JSONResponse({"error": {"message": "no"}}, status_code=401)
    how = request.headers[MODEL_HEADER]
    said = {SERVED_BY_HEADER: SERVED}
    if how == "whole":
        return JSONResponse({"choices": [], "usage": {"prompt_tokens": 3}}, headers=said)
    if how == "engine-error":
        body = {"error": {"message": "too long", "type": "BadRequestError", "code": 400}}
        return JSONResponse(body, status_code=400, headers={**said, ENGINE_ERROR_HEADER: "1"})
    if how == "bad-served-by":
        return JSONResponse({}, headers={SERVED_BY_HEADER: '{"provider_id": 7}'})
    if how == "not-json":
        return Response(b"\xff\xfe", headers=said)
    if how == "list":
        return JSONResponse([1, 2], headers=said)
    if how == "huge":
        return Response(b" " * (pool_client.MAX_ANSWER_BYTES + 1), headers=said)
    if how == "slow":  # taken at once; the engine's answer comes a second later
        await asyncio.sleep(1)
        return JSONResponse({"choices": []}, headers=said)
    if how == "not-taken":
        return JSONResponse({"error": {}}, status_code=503, headers={NOT_TAKEN_HEADER: "1"})
    if how == "taken-then-stalled":  # what the gateway answers when it cut a stalled replica
        return JSONResponse({"error": {}}, status_code=503, headers={**said, STALLED_HEADER: "1"})
    if how == "stalled-bad-served-by":
        bad = {SERVED_BY_HEADER: '{"provider_id": 7}', STALLED_HEADER: "1"}
        return JSONResponse({"error": {}}, status_code=503, headers=bad)
    if how == "stalled":  # headers, then a body that stops coming

        async def stall() -> AsyncIterator[bytes]:
            yield b"{"
            await asyncio.sleep(5)

        return StreamingResponse(stall(), headers=said)
    if how == "busy":
        return JSONResponse({"error": {}}, status_code=503)

    async def cut() -> AsyncIterator[bytes]:  # events cut mid-way, as TCP may
        text = b'data: {"n": 1}\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n'
        for i in range(0, len(text), 7):
            yield text[i : i + 7]

    async def bytewise() -> AsyncIterator[bytes]:  # cut inside each character's bytes too
        for byte in TEXT_EVENTS.encode():
            yield bytes([byte])
            await asyncio.sleep(0.005)  # each byte sent on its own

    async def endless() -> AsyncIterator[bytes]:  # one event that never ends (well: twice the cap)
        for _ in range(2 * pool_client.MAX_EVENT_BYTES // 65536):
            yield b"x" * 65536
            await asyncio.sleep(0)

    body = cut() if how == "stream" else bytewise() if how == "stream-utf8" else endless()
    return StreamingResponse(body, media_type="text/event-stream", headers=said)


# what the pool answers to `GET /pool/replicas` in the test that sets it: (status, body)
replica_answer: list[tuple[int, bytes]] = [(200, b'{"replicas": [], "online": []}')]


async def replicas(request: Request) -> Response:
    if not credential_matches(request.headers.get("authorization"), credential_digest(TOKEN)):
        return JSONResponse({"error": {"message": "no"}}, status_code=401)
    status, body = replica_answer[-1]
    return Response(body, status_code=status, media_type="application/json")


@pytest.fixture(scope="module")
def pool_url() -> Iterator[str]:
    app = Starlette(
        routes=[
            Route("/pool/replicas", replicas, methods=["GET"]),
            Route("/pool/{endpoint}", behave, methods=["POST"]),
        ]
    )
    with serving(app) as url:
        yield f"{url}/pool"


async def open_(
    url: str, how: str, stream: bool = False, token: str = TOKEN, read_timeout_s: float = 30, **kw
):  # noqa: ANN201
    client = PoolClient(url, token, read_timeout_s=read_timeout_s)
    try:
        answer = await client.open(how, "chat", '{"model": "m"}', stream, **kw)
        if stream:
            return answer, [e async for e in answer.events()]
        return answer, None
    finally:
        await client.aclose()


async def test_a_whole_answer_and_who_served_it(pool_url: str) -> None:
    answer, _ = await open_(pool_url, "whole", headers={"x-darkgpu-replicas": "r1"})
    assert answer.served_by == ServedBy("p1", "basic", "r1")
    assert answer.whole == {"choices": [], "usage": {"prompt_tokens": 3}}
    sent = seen[-1]
    assert sent["authorization"] == f"Bearer {TOKEN}"
    assert sent["x-darkgpu-replicas"] == "r1" and sent[MODEL_HEADER] == "whole"


async def test_a_stream_cut_anywhere_arrives_as_whole_events(pool_url: str) -> None:
    _, events = await open_(pool_url, "stream", stream=True)
    assert "".join(events) == 'data: {"n": 1}\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n'
    assert all(e.endswith("\n\n") for e in events)


async def test_a_stream_cut_inside_characters_arrives_as_the_same_text(pool_url: str) -> None:
    _, events = await open_(pool_url, "stream-utf8", stream=True)
    assert "".join(events) == TEXT_EVENTS


async def test_the_engines_refusal_is_told_as_its_own(pool_url: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        await open_(pool_url, "engine-error")
    assert info.value.message == "too long"


@pytest.mark.parametrize("how", ["bad-served-by", "not-json", "list", "huge", "busy"])
async def test_a_pool_that_answers_out_of_contract_is_a_clean_503(pool_url: str, how: str) -> None:
    with pytest.raises(Unavailable) as info:
        await open_(pool_url, how)
    assert info.value.headers["Retry-After"]


async def test_a_whole_answer_that_stalls_is_a_clean_503(pool_url: str) -> None:
    with pytest.raises(Unavailable):
        await open_(pool_url, "stalled", read_timeout_s=0.5)


async def test_a_wrong_credential_is_a_503_not_the_pools_words(pool_url: str) -> None:
    with pytest.raises(Unavailable):
        await open_(pool_url, "whole", token="guess")


async def test_an_event_that_never_ends_is_cut_off(pool_url: str) -> None:
    with pytest.raises(Unavailable):
        await open_(pool_url, "endless", stream=True)


async def test_a_request_no_replica_took_is_given_back_to_route_again(pool_url: str) -> None:
    with pytest.raises(NotTaken):
        await open_(pool_url, "not-taken", take_within_s=0.25)
    assert seen[-1][TAKE_WITHIN_HEADER] == "0.25"  # what the pool's gateway waits for


async def test_a_replica_that_took_the_request_and_stalled_is_named_to_route_around(
    pool_url: str,
) -> None:
    with pytest.raises(Stalled) as stalled:
        await open_(pool_url, "taken-then-stalled", answer_within_s=12.5)
    assert seen[-1][ANSWER_WITHIN_HEADER] == "12.5"  # what the pool's gateway waits for
    assert stalled.value.served_by == ServedBy("p1", "basic", "r1")
    # a stall the pool cannot say who made is the pool's refusal
    with pytest.raises(Unavailable):
        await open_(pool_url, "stalled-bad-served-by", answer_within_s=1)
    await open_(pool_url, "whole")
    assert ANSWER_WITHIN_HEADER not in seen[-1]  # none given: none sent


async def test_an_answer_slower_than_the_time_to_take_it_is_waited_for(pool_url: str) -> None:
    """The time to take a request is the gateway's to keep; once a replica took it, the
    engine's answer takes what it takes (before, the ingress cut it and sent it again)."""
    answer, _ = await open_(pool_url, "slow", take_within_s=0.2)
    assert answer.whole == {"choices": []}


async def test_a_pool_that_is_not_there_is_a_503() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(DarkGpuError) as info:
        await open_(f"http://127.0.0.1:{port}/pool", "whole")
    assert info.value.status == 503


# --- the pool's list of replicas --------------------------------------------------------------

LISTED = PoolReplica("m", "r1", "a" * 56, {"provider_id": "p1", "ongoing": 0})


async def both(url: str, token: str = TOKEN) -> tuple[PoolListing, PoolListing]:
    """The list as the ingress reads it (async) and as the billing actor's metrics do."""
    client = PoolClient(url, token, read_timeout_s=5)
    try:
        read = await client.replicas()
    finally:
        await client.aclose()
    return read, await asyncio.to_thread(PoolAdmin(url, token).replicas)


async def test_the_pools_replicas_are_read_and_parsed(pool_url: str) -> None:
    body = b'{"replicas": [%s, {"model": 1}], "online": ["m"]}' % json.dumps(LISTED.json()).encode()
    replica_answer.append((200, body))
    read = PoolListing([LISTED], frozenset({"m"}))  # the malformed entry left out
    assert await both(pool_url) == (read, read)


@pytest.mark.parametrize(
    "answer",
    [
        (503, b'{"replicas": []}'),
        (200, b"<html>"),
        (200, b"[]"),
        (200, b'{"replicas": [' + b" " * MAX_LIST_BYTES + b"]}"),
    ],
    ids=["refused", "not-json", "not-a-list", "huge"],
)
async def test_a_replica_list_out_of_contract_is_an_error_not_a_list(
    pool_url: str, answer: tuple[int, bytes]
) -> None:
    """The directory keeps its last reading on an error (`serve_app.replica_stats`): an
    empty list here would take every replica out of routing."""
    replica_answer.append(answer)
    client = PoolClient(pool_url, TOKEN, read_timeout_s=5)
    try:
        with pytest.raises((ValueError, Unavailable)):
            await client.replicas()
    finally:
        await client.aclose()
    with pytest.raises(ValueError):
        await asyncio.to_thread(PoolAdmin(pool_url, TOKEN).replicas)


async def test_a_replica_list_asked_with_a_wrong_credential_is_refused(pool_url: str) -> None:
    replica_answer.append((200, b'{"replicas": [], "online": []}'))
    client = PoolClient(pool_url, "guess", read_timeout_s=5)
    try:
        with pytest.raises(ValueError):
            await client.replicas()
    finally:
        await client.aclose()


async def test_a_pool_call_writes_no_log_line(
    pool_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An HTTP client that logs every request at INFO (httpx did) writes, through a Serve
    replica's logging (which keeps INFO), one JSON line per generation and per replica-list
    poll with Ray's handler (issue 13: 2% of the ingress's CPU at c=16). Its failures still
    reach the log, as the client's errors."""
    with caplog.at_level(logging.INFO):
        await open_(pool_url, "whole", headers={"x-darkgpu-replicas": "r1"})
        client = PoolClient(pool_url, TOKEN, read_timeout_s=30)
        try:
            await client.replicas()
        finally:
            await client.aclose()
    assert [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith(("httpx", "httpcore", "aiohttp"))
    ] == []
