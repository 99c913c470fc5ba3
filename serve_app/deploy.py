"""Deploying the Serve application onto a running cluster (used by `darkgpu up`)."""

from __future__ import annotations

import ray
from ray import serve

from cluster.settings import Settings
from serve_app.app import APP_NAME, build_app


def deploy(settings: Settings, address: str) -> None:
    """Connect, start Serve's HTTP proxy, and run the application until it is ready."""
    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": settings.http_host, "port": settings.http_port})
    serve.run(
        build_app(settings.model_dump(mode="json")),
        name=APP_NAME,
        route_prefix="/",
        blocking=False,
    )


def is_deployed(address: str) -> bool:
    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    return APP_NAME in serve.status().applications


def undeploy() -> None:
    if ray.is_initialized():
        serve.shutdown()
