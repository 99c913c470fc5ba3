"""The control plane's blocking calls to a pool (its nodes, a drain), against a real HTTP
server that answers as a hostile pool would: the pool's cluster holds providers' nodes, so
what its gateway says is parsed as untrusted, and an answer out of contract is an error the
caller survives (it keeps what it last knew), never an empty table acted on."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cluster.nodes import ClusterNode
from serve_app.pool_admin import PoolAdmin
from serve_app.pool_protocol import MAX_LIST_BYTES, credential_digest, credential_matches
from tests.http_server import serving

TOKEN = "pool-secret"
NODE = ClusterNode("a" * 56, True, {"darkgpu.io/provider-id": "p1"}, {"CPU": 4.0}, False)
# what the pool answers next, by path: (status, body); and what it was asked to drain
answers: dict[str, tuple[int, bytes]] = {}
drained: list[object] = []
peers: list[object] = []  # each request's client address and port


async def answer(request: Request) -> Response:
    if not credential_matches(request.headers.get("authorization"), credential_digest(TOKEN)):
        return JSONResponse({"error": {"message": "no"}}, status_code=401)
    path = request.path_params["path"]
    peers.append(request.client)
    if path == "drain":
        drained.append(json.loads(await request.body()))
    status, body = answers[path]
    return Response(body, status_code=status, media_type="application/json")


@pytest.fixture(scope="module")
def pool() -> Iterator[PoolAdmin]:
    app = Starlette(routes=[Route("/pool/{path}", answer, methods=["GET", "POST"])])
    with serving(app) as url:
        yield PoolAdmin(f"{url}/pool", TOKEN)


def test_the_pools_nodes_are_read_and_each_parsed_on_its_own(pool: PoolAdmin) -> None:
    good = {"node_id": NODE.node_id, "alive": True, "labels": dict(NODE.labels),
            "resources": {"CPU": 4}, "draining": False}  # fmt: skip
    bad = [
        {**good, "node_id": "x" * 56},
        {**good, "node_id": "A" * 56},
        {**good, "alive": "yes"},
        {**good, "labels": {"k": 1}},
        {**good, "labels": {str(i): "v" for i in range(65)}},
        {**good, "resources": {"GPU": -1}},
        {**good, "resources": {"GPU": True}},
        {**good, "resources": {"GPU": "8"}},
        {**good, "draining": None},
        "node",
    ]
    answers["nodes"] = (200, json.dumps({"nodes": [good, *bad]}).encode())
    assert pool.nodes() == [NODE]


def test_calls_share_one_kept_alive_connection(pool: PoolAdmin) -> None:
    """The supply reconciler and the billing actor call every second: a client (and an SSL
    context, loaded from the CA bundle) made per call was most of their idle CPU."""
    answers["nodes"] = (200, b'{"nodes": []}')
    pool.nodes()
    peers.clear()
    for _ in range(3):
        pool.nodes()
    assert len(peers) == 3 and len(set(peers)) == 1


@pytest.mark.parametrize(
    "said",
    [
        (503, b'{"nodes": []}'),
        (200, b"<html>"),
        (200, b'{"nodes": {}}'),
        (200, b'{"nodes": [' + b" " * MAX_LIST_BYTES + b"]}"),
    ],
    ids=["refused", "not-json", "not-a-list", "huge"],
)
def test_a_node_table_out_of_contract_is_an_error_not_a_table(
    pool: PoolAdmin, said: tuple[int, bytes]
) -> None:
    """An empty table read from garbage would plan no supply at all."""
    answers["nodes"] = said
    with pytest.raises(ValueError):
        pool.nodes()


def test_a_wrong_credential_reads_nothing(pool: PoolAdmin) -> None:
    answers["nodes"] = (200, b'{"nodes": []}')
    with pytest.raises(ValueError):
        PoolAdmin(pool._url, "guess").nodes()


def test_a_drain_is_asked_with_its_reason_and_its_answer_checked(pool: PoolAdmin) -> None:
    answers["drain"] = (200, b'{"accepted": true}')
    assert pool.drain(NODE.node_id, "darkgpu: its provider p1 is not approved") is True
    assert drained[-1] == {"node_id": NODE.node_id,
                           "reason": "darkgpu: its provider p1 is not approved"}  # fmt: skip
    for said in ((200, b'{"accepted": "yes"}'), (200, b"[]"), (400, b'{"accepted": true}')):
        answers["drain"] = said
        with pytest.raises(ValueError):
            pool.drain(NODE.node_id, "why")


def test_a_pool_that_is_not_there_raises() -> None:
    with pytest.raises(httpx.HTTPError):
        PoolAdmin("http://127.0.0.1:9/pool", TOKEN, timeout_s=1).nodes()
