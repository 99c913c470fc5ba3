"""A replica's own HTTP server (`serve_app.replica_http`): replicas share the port, the client
is the socket peer whatever it claims, and stopping lets the requests in flight finish."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from serve_app.replica_http import ReplicaHttpServer, ServesHttp, listening_socket

Handler = Callable[[Request], Awaitable[dict[str, Any]]]


def asgi(handler: Handler) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await JSONResponse(await handler(Request(scope, receive)))(scope, receive, send)

    return app


def named(name: str) -> Handler:
    async def handler(request: Request) -> dict[str, Any]:
        return {"replica": name, "client": request.client.host if request.client else None}

    return handler


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def fresh_connection_get(url: str, **headers: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:  # a new connection each time
        answer = await client.get(url, headers=headers, timeout=10)
        answer.raise_for_status()
        return dict(answer.json())


async def test_two_replicas_share_the_port_and_either_may_leave() -> None:
    port = free_port()
    first = ReplicaHttpServer(asgi(named("a")), "127.0.0.1", port)
    second = ReplicaHttpServer(asgi(named("b")), "127.0.0.1", port)
    url = f"http://127.0.0.1:{port}/"
    seen = {(await fresh_connection_get(url))["replica"] for _ in range(64)}
    assert seen == {"a", "b"}  # the kernel spreads connections over both
    await first.stop()
    assert not first.serving and second.serving
    after = {(await fresh_connection_get(url))["replica"] for _ in range(16)}
    assert after == {"b"}
    await second.stop()
    with pytest.raises(httpx.ConnectError):
        await fresh_connection_get(url)


async def test_the_client_is_the_socket_peer_whatever_it_forwards() -> None:
    """uvicorn believes `X-Forwarded-For` from loopback by default; here it must not (the
    platform's throttles decide whom to believe: `serve_app.throttle`)."""
    port = free_port()
    server = ReplicaHttpServer(asgi(named("a")), "127.0.0.1", port)
    try:
        url = f"http://127.0.0.1:{port}/"
        for claimed in ("203.0.113.7", "203.0.113.7, 10.0.0.1"):
            said = await fresh_connection_get(
                url, **{"x-forwarded-for": claimed, "x-real-ip": "203.0.113.8"}
            )
            assert said["client"] == "127.0.0.1"
    finally:
        await server.stop()


async def test_stopping_finishes_the_request_in_flight_and_takes_no_new_one() -> None:
    port = free_port()
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(request: Request) -> dict[str, Any]:
        arrived.set()
        await release.wait()
        return {"replica": "slow"}

    server = ReplicaHttpServer(asgi(slow), "127.0.0.1", port)
    url = f"http://127.0.0.1:{port}/"
    in_flight = asyncio.create_task(fresh_connection_get(url))
    await asyncio.wait_for(arrived.wait(), 10)
    stopping = asyncio.create_task(server.stop())
    await asyncio.sleep(0.3)  # uvicorn's main loop looks at `should_exit` every 0.1 s
    assert not stopping.done()  # waiting for the request
    with pytest.raises(httpx.ConnectError):  # the listener is closed meanwhile
        await fresh_connection_get(url)
    release.set()
    assert (await asyncio.wait_for(in_flight, 10)) == {"replica": "slow"}
    await asyncio.wait_for(stopping, 10)


def test_a_port_held_without_reuse_is_not_taken() -> None:
    """Another program's listener on the port (no `SO_REUSEPORT`) keeps it: the replica fails
    to start instead of sharing it."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError):
            listening_socket("127.0.0.1", other.getsockname()[1]).close()


async def test_a_replicas_destructor_stops_its_server_once() -> None:
    """Serve awaits what `__del__` returns; Python calls it again when it collects the object,
    and on objects never started (a coroutine function would leave coroutines unawaited).
    Health fails once the server stopped: Serve then replaces the replica. The replica lets
    go of what it holds (its clients' connections) once its server stopped, once."""
    serving_when_let_go: list[bool] = []

    class Replica(ServesHttp):
        def __init__(self, port: int) -> None:
            self._http = ReplicaHttpServer(asgi(named("a")), "127.0.0.1", port)
            self._server = self._http

        async def let_go(self) -> None:
            serving_when_let_go.append(self._server.serving)

    port = free_port()
    replica = Replica(port)
    server = replica._http
    replica.check_health()
    stopping = replica.__del__()
    assert stopping is not None and server is not None
    await stopping
    assert not server.serving
    assert serving_when_let_go == [False]
    with pytest.raises(RuntimeError, match="not serving"):
        replica.check_health()
    assert replica.__del__() is None  # collected later: nothing left to stop
    assert object.__new__(Replica).__del__() is None  # never constructed
    assert serving_when_let_go == [False]
