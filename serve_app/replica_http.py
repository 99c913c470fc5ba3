"""A replica's own HTTP server: the platform's two HTTP front doors without Serve's proxy.

Serve's HTTP proxy is an actor of its own between the socket and the replica: for each request
it routes to the replica over a handle, and the replica calls back into the proxy to receive
the body (`receive_asgi_messages`). On these machines that costs ~5 ms of CPU per request and
per proxy (issue 13: `bench/platform_cpu.py`; an echo deployment answered 275 requests/s at
c=16 through the proxy and 800 on its own server), and the platform had two on every request:
the control plane's, in front of the ingress, and the pool's, in front of its gateway.

So the inference ingress (`serve_app.ingress`) and each pool's gateway (`serve_app.pool`)
answer HTTP themselves, on the platform's port and the pool's, and their clusters run no Serve
proxy (`proxy_location: Disabled`). This module is that server: uvicorn, on the replica's own
event loop, as Serve's own direct ingress runs it (`ray.serve._private.http_util`), but bound
with `SO_REUSEPORT`, so that several replicas of one deployment on a host share the port (the
kernel spreads connections among them) and a replacement binds while the replica it replaces
drains (Serve's proxy binds its port so too: `SERVE_SOCKET_REUSE_PORT_ENABLED`, on by default).
Linux keeps a port's `SO_REUSEPORT` group to one user: a pool's head, run as a user of
its own (`Settings.pool_user`), cannot join the control plane's port. (Serve's own direct
ingress takes a port from a range, one per replica, without `SO_REUSEPORT`: a fixed front
door cannot be one of those, and a replacement could not start while its predecessor drains.)

The client's address is the socket peer: uvicorn's `X-Forwarded-For` handling is off
(`proxy_headers=False`), and the platform decides whom to believe (`serve_app.throttle`,
`Settings.trusted_proxies`). No access log: the platform's metrics count every request.
`stop` closes the listener at once, then lets the requests in flight finish, for at most
`grace_s` (Serve's graceful shutdown calls the replica's `__del__`, which calls it; keep it
under the deployment's `graceful_shutdown_timeout_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Iterator

import uvicorn
from starlette.types import ASGIApp

logger = logging.getLogger("darkgpu.replica_http")
KEEP_ALIVE_S = 90  # Serve's proxy's (DEFAULT_UVICORN_KEEP_ALIVE_TIMEOUT_S)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP listener on host:port that replicas of the same user may share (`SO_REUSEPORT`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """The replica's process is Ray's, and so are its signals (uvicorn would take SIGTERM
        and SIGINT while it serves, on the main thread: Serve's user code runs there in its
        throughput-optimized mode)."""
        yield


class ReplicaHttpServer:
    """`app` served on host:port from the running event loop, until `stop`."""

    def __init__(self, app: ASGIApp, host: str, port: int, *, grace_s: int = 15) -> None:
        self._sock = listening_socket(host, port)
        config = uvicorn.Config(
            app,
            interface="asgi3",
            lifespan="off",
            proxy_headers=False,
            server_header=False,
            access_log=False,
            log_config=None,
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=grace_s,
        )
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[self._sock])
        )
        self._task.add_done_callback(self._ended)

    @property
    def serving(self) -> bool:
        return not self._task.done()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("the replica's HTTP server ended: %r", task.exception())

    async def stop(self) -> None:
        """Stop taking connections, let the requests in flight finish, then return."""
        self._server.should_exit = True
        await asyncio.wait({self._task})


class ServesHttp:
    """A deployment whose replica serves HTTP itself (`_http`, set by its constructor): Serve
    replaces the replica whose server stopped (`check_health`), and its graceful shutdown
    calls `__del__` and awaits what it returns: the server's `stop`, then `let_go`, once.
    Python calls `__del__` too when it collects the object, and finds nothing left to stop (an
    `async def __del__` would leave a coroutine never awaited there)."""

    _http: ReplicaHttpServer | None

    def check_health(self) -> None:
        if self._http is None or not self._http.serving:
            raise RuntimeError(f"{type(self).__name__}'s HTTP server is not serving")

    def __del__(self) -> Awaitable[None] | None:
        http: ReplicaHttpServer | None = getattr(self, "_http", None)
        self._http = None
        return None if http is None else self._shut_down(http)

    async def _shut_down(self, http: ReplicaHttpServer) -> None:
        await http.stop()
        await self.let_go()

    async def let_go(self) -> None:
        """What the replica lets go once its server stopped (its clients' connections)."""
