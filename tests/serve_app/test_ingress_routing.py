"""The ingress's routing around a replica that took a request and gave nothing
(`Ingress._routed`, given the time `answer_within_s`), against a pool over real HTTP that
plays hostile providers: the request goes to another replica, never back to one that stalled
on it, and after two stalls it is refused, nothing having been delivered (so nothing billed).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cluster.catalog import CatalogModel
from core.settings import Settings
from kernel.errors import Unavailable
from kernel.labels import TrustTier
from serve_app.ingress import MAX_STALLS, Ingress, Sent, answer_within_s
from serve_app.pool_client import PoolClient
from serve_app.pool_protocol import (
    ANSWER_WITHIN_HEADER,
    MAX_ANSWER_WITHIN_S,
    MODEL_HEADER,
    SERVED_BY_HEADER,
    STALLED_HEADER,
    PoolReplica,
    ServedBy,
    parse_answer_within,
    replicas_body,
)
from serve_app.provider_policy import Price, Ranked, Requirements, rank
from serve_app.replica_stats import ReplicaDirectory
from serve_app.router import REPLICAS_HEADER, InFlight
from tests.http_server import serving

MODEL = "m"
REPLICAS = {"r1": "p1", "r2": "p2", "r3": "p3"}
CATALOG = Price(10, 20)
CARD = CatalogModel.model_validate(
    {"id": MODEL, "source": "local:m", "input_usd_per_1m": "10", "output_usd_per_1m": "20",
     "min_vram_gb": 0, "context_length": 4096, "quantization": "bf16", "class": "local"}
)  # fmt: skip
stalling: set[str] = set()  # the replicas whose provider's engine holds back every answer
took: list[tuple[str, str]] = []  # (replica, the answer-within the pool was given)


def served_by(replica: str) -> ServedBy:
    return ServedBy(REPLICAS[replica], "basic", replica)


async def chat(request: Request) -> Response:
    """As the pool's gateway answers: the first listed replica takes the request; one that
    stalls is cut after the time given and named (the gateway's real cut is
    tests/serve_app/test_pool.py's)."""
    replica = request.headers[REPLICAS_HEADER].split(",")[0]
    took.append((replica, request.headers.get(ANSWER_WITHIN_HEADER, "")))
    said = {SERVED_BY_HEADER: served_by(replica).header()}
    if replica in stalling:
        return JSONResponse({"error": {}}, status_code=503, headers={**said, STALLED_HEADER: "1"})
    assert request.headers[MODEL_HEADER] == MODEL
    return JSONResponse({"choices": [], "usage": {"prompt_tokens": 3}}, headers=said)


async def replicas(request: Request) -> Response:
    listed = [
        PoolReplica(MODEL, replica, f"{i}" * 56, {"provider_id": provider, "trust_tier": "basic"})
        for i, (replica, provider) in enumerate(REPLICAS.items())
    ]
    return Response(replicas_body(listed, {MODEL}), media_type="application/json")


@pytest.fixture(scope="module")
def pool_url() -> Iterator[str]:
    app = Starlette(
        routes=[
            Route("/pool/replicas", replicas, methods=["GET"]),
            Route("/pool/{endpoint}", chat, methods=["POST"]),
        ]
    )
    with serving(app) as url:
        yield f"{url}/pool"


async def route(pool_url: str) -> tuple[Ingress, PoolClient, Ranked]:
    """An ingress replica as `_routed` needs it: its pool client, its directory of the pool's
    replicas, its count of requests in flight (the rest of it is not used to route)."""
    client = PoolClient(pool_url, "pool-secret", read_timeout_s=30)
    ingress = Ingress.__new__(Ingress)
    ingress._pools = {TrustTier.basic: client}
    ingress._directory = ReplicaDirectory({TrustTier.basic: client.replicas}, ttl_s=0)
    ingress._in_flight = InFlight()
    ranked = rank(await ingress._directory.replicas(MODEL), Requirements(), CATALOG, MODEL)
    assert isinstance(ranked, Ranked)
    return ingress, client, ranked


SENT = Sent(MODEL, "chat", '{"model": "m"}', False, answer_within_s=42.0)


async def test_a_request_a_replica_stalled_on_goes_to_another_and_never_back(
    pool_url: str,
) -> None:
    ingress, client, ranked = await route(pool_url)
    first = ranked.replica_ids[0]
    stalling.clear()
    stalling.add(first)
    took.clear()
    try:
        answer = await ingress._routed(SENT, CARD, Requirements(), CATALOG, ranked)
    finally:
        await client.aclose()
    assert answer.whole == {"choices": [], "usage": {"prompt_tokens": 3}}
    assert answer.served_by.replica != first
    assert [replica for replica, _ in took] == [first, answer.served_by.replica]
    assert {within for _, within in took} == {"42"}  # the time the ingress gave, each time
    assert not ingress._in_flight[first]  # nothing left counted in flight


async def test_a_request_every_replica_stalls_on_is_refused_after_two(pool_url: str) -> None:
    ingress, client, ranked = await route(pool_url)
    stalling.update(REPLICAS)
    took.clear()
    try:
        with pytest.raises(Unavailable) as refused:
            await ingress._routed(SENT, CARD, Requirements(), CATALOG, ranked)
    finally:
        stalling.clear()
        await client.aclose()
    assert refused.value.status == 503
    assert "answered" in str(refused.value)
    assert len(took) == MAX_STALLS  # each to another replica
    assert len({replica for replica, _ in took}) == MAX_STALLS


def test_the_time_to_answer_grows_with_what_was_asked_and_stays_within_the_protocol() -> None:
    """A stream's first event has the base; a whole answer the base and its tokens at the floor
    rate; a request asking for more tokens than the protocol's bound allows at that rate gets
    the bound, which the pool's gateway takes (past it the gateway refuses the header: an
    honest request of many completions would be refused)."""
    settings = Settings(pool_answer_base_s=60, pool_answer_floor_tokens_per_s=2)
    assert answer_within_s(settings, True, 1_000) == 60
    assert answer_within_s(settings, False, 1_000) == 560
    huge = answer_within_s(settings, False, 128 * 1024 * 16)  # 16 completions of 128k tokens
    assert huge == MAX_ANSWER_WITHIN_S
    assert parse_answer_within(f"{huge:g}") == MAX_ANSWER_WITHIN_S
