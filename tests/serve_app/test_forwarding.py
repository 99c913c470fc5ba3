"""The inference ingress forwards every public route to the accounts deployment
(`serve_app.forwarding`): what the client sent arrives whole, what the accounts app answered
comes back whole, and nothing a client sends can change who it is taken for.

In process: the ingress's app forwards by calling the accounts app directly (`call_app`,
what the accounts replica runs), in place of Serve's handle between the two replicas. The
platform tests (`test_api.py`, `test_platform_accounts.py`, the browser test) run every
public route through the real hop."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.testclient import TestClient

from billing.plans import load_plans
from core.db import migrate
from core.settings import DEFAULT_PLANS_FILE
from serve_app.forwarding import Forwarded, Reply, call_app, mirrored_routes
from serve_app.http_app import create_app
from serve_app.middleware import REQUEST_ID_HEADER, RequestIdMiddleware
from serve_app.services import Services
from tests.billing.conftest import make_customer

REDIS_URL = os.environ.get("DARKGPU_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

echo = APIRouter()


@echo.post("/v1/things/{name}")
async def thing(request: Request, name: str) -> Response:
    """Says what it saw, and sets two cookies."""
    seen = {
        "name": name,
        "query": request.url.query,
        "body": (await request.body()).decode(),
        "client": request.client.host if request.client else None,
        "request_id": request.state.request_id,
        "forwarded_for": request.headers.get("x-forwarded-for"),
    }
    response = Response(str(seen), status_code=201, media_type="text/plain")
    response.set_cookie("a", "1")
    response.set_cookie("b", "2")
    return response


@echo.get("/v1/things")
async def things() -> dict[str, str]:
    return {"object": "list"}


def accounts_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(RequestIdMiddleware)
    app.include_router(echo)
    return app


def ingress_app(send) -> FastAPI:
    app = FastAPI()
    app.router.routes.extend(mirrored_routes([echo], send))
    app.add_middleware(RequestIdMiddleware)
    return app


def forwarding_to(accounts: FastAPI, ingress=ingress_app) -> tuple[TestClient, list[Forwarded]]:
    """A client of `ingress(send)`, whose `send` runs the request through `accounts`."""
    sent: list[Forwarded] = []

    async def send(request: Forwarded) -> Reply:
        sent.append(request)
        return await call_app(accounts, request)

    return TestClient(ingress(send), client=("203.0.113.7", 50123)), sent


def test_a_forwarded_request_arrives_whole_and_its_answer_comes_back_whole() -> None:
    client, sent = forwarding_to(accounts_app())
    response = client.post("/v1/things/w%20x?y=1&z=2", content=b'{"k": "v"}')
    assert response.status_code == 201
    seen = eval(response.text)  # noqa: S307 - the dict the echo route wrote, from this test
    assert seen["name"] == "w x" and seen["query"] == "y=1&z=2" and seen["body"] == '{"k": "v"}'
    assert seen["client"] == "203.0.113.7"  # the peer's address, for the sign-in throttle
    # both cookies survive; one request id, the ingress's, named once
    assert response.headers.get_list("set-cookie")[0].startswith("a=1")
    assert response.headers.get_list("set-cookie")[1].startswith("b=2")
    assert response.headers.get_list(REQUEST_ID_HEADER) == [seen["request_id"]]
    assert sent[0].request_id == seen["request_id"]


def test_a_client_cannot_name_its_request_or_its_address() -> None:
    """The id and the address come from the ingress's own scope, never from a header."""
    client, _ = forwarding_to(accounts_app())
    response = client.post(
        "/v1/things/x",
        headers={REQUEST_ID_HEADER: "req_chosen", "x-forwarded-for": "10.0.0.1"},
    )
    seen = eval(response.text)  # noqa: S307
    assert seen["request_id"] != "req_chosen" and seen["request_id"].startswith("req_")
    assert seen["client"] == "203.0.113.7"
    assert response.headers.get_list(REQUEST_ID_HEADER) == [seen["request_id"]]


def test_only_the_mirrored_routes_and_methods_are_forwarded() -> None:
    client, sent = forwarding_to(accounts_app())
    assert client.get("/v1/things").json() == {"object": "list"}
    assert client.get("/v1/things/x").status_code == 405  # POST only: not sent
    assert client.get("/v1/elsewhere").status_code == 404
    assert [r.path for r in sent] == ["/v1/things"]


def test_accounts_away_is_a_503_in_the_openai_shape(svc: Services) -> None:
    async def away(request: Forwarded) -> Reply:
        raise RuntimeError("the replica died")

    response = TestClient(create_app(svc, forward=away)).get("/faq")
    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert response.json()["error"]["type"] == "service_unavailable"


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Services]:
    services = Services.create({"data_dir": str(tmp_path), "redis_url": REDIS_URL})
    migrate(services.db)
    yield services
    services.db.dispose()


def test_the_ingress_app_forwards_every_public_route_to_the_accounts_app(svc: Services) -> None:
    ingress, sent = forwarding_to(create_app(svc), lambda send: create_app(svc, forward=send))
    customer = make_customer(
        svc.db, redis.Redis.from_url(REDIS_URL), load_plans(DEFAULT_PLANS_FILE), plan="paid"
    )
    auth = {"authorization": f"Bearer {customer.key}"}
    with ingress:  # one event loop for every request: the async Redis client is bound to it
        credits = ingress.get("/v1/credits", headers=auth)
        assert credits.status_code == 200 and credits.json()["account_id"] == customer.account_id
        usage = ingress.get("/v1/usage?group_by=model", headers=auth)
        assert usage.status_code == 200 and usage.json()["group_by"] == "model"
        keys = ingress.get("/v1/keys", headers=auth).json()["data"]
        assert [k["id"] for k in keys] == [customer.key_id]
        assert "<html" in ingress.get("/faq").text.lower()
        assert ingress.post("/v1/credits", headers=auth).status_code == 405  # not sent
        refused = ingress.get("/v1/usage", headers={"authorization": "Bearer dgpu-x"})
        assert refused.status_code == 401 and refused.json()["error"]["type"]
        paths = [r.path for r in sent]
        assert paths == ["/v1/credits", "/v1/usage", "/v1/keys", "/faq", "/v1/usage"]
