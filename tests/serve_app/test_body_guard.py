"""The body guard: a bad key is refused before any of the body is read; bodies are bounded.

Against the real admission (a real Redis) behind a real ASGI app that records what it read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import redis
from sqlalchemy import Engine
from starlette.types import Receive, Scope, Send

from billing import accounts as svc
from billing.admission import Admission
from billing.plans import Plans
from serve_app.body_guard import BodyGuard, GoodKeys, inference_body_limit
from serve_app.gate import Gate
from tests.billing import conftest as billing
from tests.billing.conftest import make_customer

db_url, engine, r, ar = billing.db_url, billing.engine, billing.r, billing.ar
plans, admission = billing.plans, billing.admission

LIMIT = 1000


class Recorder:
    """The app behind the guard: reads the whole body and says how much it got."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})


def guarded(admission: Admission, **kw) -> tuple[Recorder, httpx.AsyncClient]:
    inner = Recorder()
    app = BodyGuard(inner, check_key=Gate(admission).key_refusal, inference_limit=LIMIT, **kw)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return inner, client


async def chunks(total: int, size: int = 100) -> AsyncIterator[bytes]:
    for _ in range(total // size):
        yield b"x" * size


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_bad_key_is_refused_before_the_body_is_read(admission: Admission) -> None:
    inner, client = guarded(admission)
    async with client:
        for headers in ({}, auth("dgpu-junk"), auth("dgpu-" + "A" * 43), {"Authorization": "x"}):
            response = await client.post("/v1/chat/completions", content=b"{}", headers=headers)
            assert response.status_code == 401, headers
            error = response.json()["error"]
            assert error["type"] == "auth" and error["code"] == "invalid_api_key"
        # a body of any size: refused just the same, and nothing reached the app
        response = await client.post(
            "/v1/completions", content=chunks(50_000), headers=auth("dgpu-junk")
        )
        assert response.status_code == 401
    assert inner.calls == 0


async def test_a_good_key_passes_and_is_remembered(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    customer = make_customer(engine, r, plans)
    good = GoodKeys(ttl_s=60)
    inner, client = guarded(admission, good_keys=good)
    async with client:
        response = await client.post(
            "/v1/chat/completions", content=b"x" * 10, headers=auth(customer.key)
        )
        assert response.status_code == 200 and response.text == "10"
        assert customer.key in good
        # revoked: the guard may let the body in for a few seconds; admission refuses it
        svc.revoke_key(engine, r, key_id=customer.key_id)
        fresh_inner, fresh = guarded(admission)
        async with fresh:
            refused = await fresh.post(
                "/v1/chat/completions", content=b"{}", headers=auth(customer.key)
            )
        assert refused.status_code == 401 and fresh_inner.calls == 0
    assert inner.calls == 1


async def test_bodies_are_bounded_declared_or_not(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    customer = make_customer(engine, r, plans)
    inner, client = guarded(admission, other_limit=200)
    async with client:
        ok = await client.post("/v1/completions", content=b"x" * LIMIT, headers=auth(customer.key))
        assert ok.status_code == 200 and ok.text == str(LIMIT)
        declared = await client.post(
            "/v1/completions", content=b"x" * (LIMIT + 1), headers=auth(customer.key)
        )
        assert declared.status_code == 413
        assert declared.json()["error"] == {
            "message": f"The request body is larger than {LIMIT} bytes.",
            "type": "invalid_request",
            "param": None,
            "code": "request_too_large",
        }
        calls = inner.calls
        # no Content-Length: cut off once it passes the limit, as it is read
        streamed = await client.post(
            "/v1/completions", content=chunks(LIMIT * 5), headers=auth(customer.key)
        )
        assert streamed.status_code == 413
        assert inner.calls == calls + 1
        # other routes: their own, smaller limit; no key needed to reach them
        assert (await client.post("/v1/auth/signup", content=b"x" * 200)).status_code == 200
        assert (await client.post("/v1/auth/signup", content=b"x" * 201)).status_code == 413
        assert (await client.get("/v1/models")).status_code == 200


def test_the_inference_limit_covers_the_largest_context() -> None:
    assert inference_body_limit(128_000) >= 128_000 * 6 * 4  # every token 4 escaped bytes
    assert inference_body_limit(256) < inference_body_limit(512)
