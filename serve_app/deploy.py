"""Deploying the Serve application onto a running cluster (used by `darkgpu up`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx
import ray
from ray import serve
from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview

from cluster.ray_internals import SERVE_REPLICA_ACTOR_PREFIX, actor_states
from core.settings import Settings
from serve_app.app import APP_NAME, build_app
from serve_app.models import MODEL_APP_PREFIX
from serve_app.pool import POOL_APP_NAME, POOL_ROUTE_PREFIX, build_pool_app


def _connect(address: str) -> None:
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)


class DeployFailed(RuntimeError):
    """Serve gave the application up (a replica's constructor failed, and so on)."""


def deploy(
    settings: Settings,
    address: str,
    note: Callable[[str], object] = lambda line: None,
    poll_s: float = 0.5,
) -> None:
    """Connect, start Serve's HTTP proxy, and run the application until it is ready,
    telling `note` each time a deployment's replicas change state (`replica_progress`)."""
    _connect(address)
    # The HTTP proxy runs on the head only: provider nodes serve model replicas, never the
    # public API (and nodes sharing one host, as in tests, would fight over its port). In
    # Serve's throughput-optimized mode (`Settings.serve_throughput_optimized`) there is no
    # proxy: the ingress replica, on a control node, answers on this port itself.
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": settings.http_host, "port": settings.http_port},
    )
    args = settings.as_args()
    serve.run_many(
        [
            serve.RunTarget(build_app(args), name=APP_NAME, route_prefix="/"),
            serve.RunTarget(
                build_pool_app(args), name=POOL_APP_NAME, route_prefix=POOL_ROUTE_PREFIX
            ),
        ],
        wait_for_applications_running=False,
    )
    said: dict[str, str] = {}
    ready_url = f"http://{settings.http_host}:{settings.http_port}/readyz"

    def tell() -> dict[str, ApplicationStatusOverview]:
        apps = {name: app for name, app in serve.status().applications.items()
                if name in (APP_NAME, POOL_APP_NAME)
                or name.startswith(MODEL_APP_PREFIX)}  # fmt: skip
        for name, app in sorted(apps.items()):
            for deployment, line in replica_progress(name, app).items():
                if said.get(deployment) != line:
                    said[deployment] = line
                    note(line)
        return apps

    while True:
        apps = tell()
        for name, app in sorted(apps.items()):
            if app.status == ApplicationStatus.DEPLOY_FAILED:
                raise DeployFailed(f"{name}: {app.message or 'Serve gave the application up'}")
        running = all(
            name in apps and apps[name].status == ApplicationStatus.RUNNING
            for name in (APP_NAME, POOL_APP_NAME)
        )
        # up: the platform's and the pool's applications run, and the ingress says every warm
        # model the supply reconciler deployed has a replica online (`Ingress.readyz`)
        if running:
            if _ready(ready_url):
                tell()  # the replicas that became ready since this turn's look, said too
                return
        time.sleep(poll_s)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


# A replica's Serve state, and where the cluster's actor table has its actor, in words
WAITING, LOADING, READY = "scheduled (waiting for a node)", "loading", "ready"


def replica_progress(app_name: str, app: ApplicationStatusOverview | None) -> dict[str, str]:
    """deployment -> one line: how many of its replicas are scheduled (their actor waits for
    a node with the resources), loading (placed, the constructor running: a model's weights)
    and ready."""
    if app is None:
        return {}
    actors = actor_states(f"{SERVE_REPLICA_ACTOR_PREFIX}{app_name}#")
    out = {}
    for name, deployment in sorted(app.deployments.items()):
        states = {str(k.value if hasattr(k, "value") else k): n
                  for k, n in deployment.replica_states.items()}  # fmt: skip
        ready = states.get("RUNNING", 0)
        mine = [state for actor, state in actors.items() if actor.split("#")[1:2] == [name]]
        waiting = sum(1 for state in mine if state in ("PENDING_CREATION", "DEPENDENCIES_UNREADY"))
        loading = max(states.get("STARTING", 0) - waiting, 0)
        parts = [f"{n} {what}" for n, what in ((waiting, WAITING), (loading, LOADING),
                                                (ready, READY)) if n]  # fmt: skip
        out[name] = f"{name}: " + (", ".join(parts) if parts else "no replica yet")
    return out


def is_deployed(address: str) -> bool:
    _connect(address)
    return APP_NAME in serve.status().applications


def undeploy(address: str) -> None:
    """Shut Serve down gracefully: each model replica stops its engine's processes, which
    a forced `ray stop` would leave behind (vLLM's engine core outlives a killed replica)."""
    _connect(address)
    serve.shutdown()  # type: ignore[no-untyped-call]  # Ray 2.60 leaves it unannotated
    ray.shutdown()  # leave before the cluster stops, or the driver reports its death
