"""Deploying the Serve applications onto running clusters (used by `darkgpu up`).

Two clusters, two applications, as DESIGN's two planes: the platform's (`darkgpu`: ingress,
accounts, billing actor, supply reconciler) on the control plane's cluster, deployed by
`deploy` in the calling process; the pool's gateway (`pool`, under `/pool`) on the supply
pool's cluster, deployed by `PoolDeploy`, a process of its own (`python -m
serve_app.deploy pool`): Ray reads a cluster's address and token once per process. That
process runs as the pool's head does (as `Settings.pool_user` where set: `cluster.pool_user`)
and reads no setting: its first line of input is what to deploy (`PoolDeployment`, the
gateway's bound arguments and where it listens). It says its head's node id (the platform's
own node there: `Settings.control_node_ids`), then each of the pool's deployments' progress,
one line each, until its input closes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypedDict

import httpx
import ray
from ray import serve
from ray.serve import Application
from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview

from cluster.ray_internals import SERVE_REPLICA_ACTOR_PREFIX, actor_states
from core.settings import Settings
from kernel.labels import TrustTier
from serve_app.app import APP_NAME, build_app
from serve_app.models import MODEL_APP_PREFIX
from serve_app.pool import POOL_APP_NAME, POOL_ROUTE_PREFIX, bind_pool_app, pool_arguments

Note = Callable[[str], object]
SAID = "darkgpu-deploy: "  # what the pool's deploy process says starts so (Ray prints too)


def _connect(address: str) -> None:
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)


class DeployFailed(RuntimeError):
    """Serve gave the application up (a replica's constructor failed, and so on)."""


def _run(app: Application, name: str, route_prefix: str) -> None:
    # No Serve HTTP proxy: the platform's ingress and each pool's gateway answer HTTP on
    # servers of their own (`serve_app.replica_http`: a proxy cost ~5 ms of CPU per request,
    # and the platform had one in each plane). Serve's own direct ingress, which its
    # throughput-optimized mode turns on, needs a proxy location, so it stays off too.
    serve.start(proxy_location="Disabled")
    serve.run_many(
        [serve.RunTarget(app, name=name, route_prefix=route_prefix)],
        wait_for_applications_running=False,
    )


class _Progress:
    """Each deployment's replica progress (`replica_progress`), told once per change."""

    def __init__(self, note: Note) -> None:
        self._note = note
        self._said: dict[str, str] = {}

    def tell(self, wanted: Callable[[str], bool]) -> dict[str, ApplicationStatusOverview]:
        apps = {name: app for name, app in serve.status().applications.items() if wanted(name)}
        for name, app in sorted(apps.items()):
            for deployment, line in replica_progress(name, app).items():
                if self._said.get(deployment) != line:
                    self._said[deployment] = line
                    self._note(line)
        for name, app in apps.items():
            if app.status == ApplicationStatus.DEPLOY_FAILED:
                raise DeployFailed(f"{name}: {app.message or 'Serve gave the application up'}")
        return apps


def deploy(
    settings: Settings,
    address: str,
    note: Note = lambda line: None,
    poll_s: float = 0.5,
) -> None:
    """Connect to the control plane's cluster and run the platform's application (its
    ingress listens on `http_host`:`http_port`) until it is ready, telling `note` each time
    a deployment's replicas change state. Ready: the ingress says every warm model of the
    supply plan has a replica online in the pool (`Ingress.readyz`)."""
    _connect(address)
    _run(build_app(settings.as_args()), APP_NAME, "/")
    progress = _Progress(note)
    ready_url = f"http://{settings.http_host}:{settings.http_port}/readyz"
    while True:
        apps = progress.tell(lambda name: name == APP_NAME)
        running = APP_NAME in apps and apps[APP_NAME].status == ApplicationStatus.RUNNING
        if running and _ready(ready_url):
            progress.tell(lambda name: name == APP_NAME)  # what became ready meanwhile
            return
        time.sleep(poll_s)


class PoolDeployment(TypedDict):
    """What the pool's deploy process deploys: the gateway's arguments
    (`serve_app.pool.pool_arguments`, where it listens among them)."""

    arguments: dict[str, Any]


def pool_deployment(settings: Settings, tier: TrustTier = TrustTier.basic) -> PoolDeployment:
    """A tier's pool's deployment, as `darkgpu up` runs it there."""
    return {"arguments": pool_arguments(settings.as_args(), tier)}


def deploy_pool(
    deployment: PoolDeployment, address: str, progress: _Progress, poll_s: float = 0.5
) -> str:
    """Connect to the pool's cluster and run its gateway until it runs; the pool head's node
    id."""
    _connect(address)
    _run(bind_pool_app(deployment["arguments"]), POOL_APP_NAME, POOL_ROUTE_PREFIX)
    while True:
        apps = progress.tell(_in_pool)
        if POOL_APP_NAME in apps and apps[POOL_APP_NAME].status == ApplicationStatus.RUNNING:
            return str(ray.get_runtime_context().get_node_id())
        time.sleep(poll_s)


def _in_pool(name: str) -> bool:
    return name == POOL_APP_NAME or name.startswith(MODEL_APP_PREFIX)


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


def undeploy_pool(
    env: Mapping[str, str], options: Mapping[str, Any] | None = None, timeout_s: float = 300
) -> None:
    """`undeploy` of the pool, in a process with the pool's Ray environment (`env`), started
    with `options` (`LocalCluster.process_options`: as the pool's user)."""
    command = [sys.executable, "-m", "serve_app.deploy", "pool-down"]
    subprocess.run(command, env=dict(env), timeout=timeout_s, check=False, **(options or {}))


class PoolDeploy:
    """The pool's deploy, in a process of its own with the pool's Ray environment (`env`, its
    whole environment), started with `options` (`LocalCluster.process_options`) and handed
    `deployment` at once: `start` returns the pool head's node id once the gateway runs; its
    replicas' progress goes on reaching `note` (from a thread) until `stop`."""

    def __init__(
        self,
        env: Mapping[str, str],
        deployment: PoolDeployment,
        note: Note,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        command = [sys.executable, "-m", "serve_app.deploy", "pool"]
        self._proc = subprocess.Popen(
            command, env=dict(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            **(options or {}),
        )  # fmt: skip
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(deployment) + "\n")
        self._proc.stdin.flush()
        self._note = note
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        for said in self._said():
            if "note" in said:
                self._note(said["note"])
            elif "node_id" in said:
                self._thread = threading.Thread(target=self._relay, daemon=True)
                self._thread.start()
                return str(said["node_id"])
        self._proc.wait(timeout=30)
        raise DeployFailed(f"the pool's deploy ended ({self._proc.returncode}) before it ran")

    def _said(self) -> Iterator[dict[str, str]]:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(SAID):
                yield json.loads(line.removeprefix(SAID))

    def _relay(self) -> None:
        for said in self._said():
            if "note" in said:
                self._note(said["note"])

    def stop(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _say(**what: str) -> None:
    sys.stdout.write(SAID + json.dumps(what) + "\n")
    sys.stdout.flush()


def _pool_main(address: str, lines: Iterator[str]) -> None:
    progress = _Progress(lambda line: _say(note=line))
    deployment: PoolDeployment = json.loads(next(lines))
    _say(node_id=deploy_pool(deployment, address, progress))
    closed = threading.Event()

    def watch_input() -> None:
        for _ in lines:
            pass
        closed.set()

    threading.Thread(target=watch_input, daemon=True).start()
    while not closed.wait(0.5):
        try:
            progress.tell(_in_pool)
        except DeployFailed as exc:
            _say(note=f"failed: {exc}")
            return


if __name__ == "__main__":
    # `python -m serve_app.deploy pool|pool-down`, with the pool's Ray environment
    # (RAY_ADDRESS, RAY_AUTH_TOKEN_PATH: `cluster.local.LocalCluster.pool(...).env()`)
    what, pool_address = sys.argv[1], os.environ["RAY_ADDRESS"]
    if what == "pool":
        _pool_main(pool_address, iter(sys.stdin))
    elif what == "pool-down":
        undeploy(pool_address)
