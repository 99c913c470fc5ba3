"""Deploying the Serve application onto a running cluster (used by `darkgpu up`)."""

from __future__ import annotations

import logging

import ray
from ray import serve

from core.settings import Settings
from serve_app.app import APP_NAME, build_app


def _connect(address: str) -> None:
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)


def deploy(settings: Settings, address: str) -> None:
    """Connect, start Serve's HTTP proxy, and run the application until it is ready."""
    _connect(address)
    # The HTTP proxy runs on the head only: provider nodes serve model replicas, never the
    # public API (and nodes sharing one host, as in tests, would fight over its port).
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": settings.http_host, "port": settings.http_port},
    )
    serve.run(build_app(settings.as_args()), name=APP_NAME, route_prefix="/", blocking=False)


def is_deployed(address: str) -> bool:
    _connect(address)
    return APP_NAME in serve.status().applications


def undeploy(address: str) -> None:
    """Shut Serve down gracefully: each model replica stops its engine's processes, which
    a forced `ray stop` would leave behind (vLLM's engine core outlives a killed replica)."""
    _connect(address)
    serve.shutdown()  # type: ignore[no-untyped-call]  # Ray 2.60 leaves it unannotated
    ray.shutdown()  # leave before the cluster stops, or the driver reports its death
