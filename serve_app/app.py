"""The Serve application, built by one function from the configuration.

`build_app` serves `darkgpu up` and `serve deploy configs/serve.yaml` alike
(`import_path: serve_app.app:build_app`; the YAML's `args` override `DARKGPU_*` settings).
It must run connected to the cluster: which models get a deployment depends on what the
alive nodes offer (`cluster.placement`). Besides the ingress and one deployment per model,
the application holds the billing actor (`billing_meter`), so it lives and dies with it.
"""

from __future__ import annotations

import threading
from typing import Any

from pydantic import SecretStr
from ray import serve
from ray.serve import Application

from billing.meter import BillingLoop
from billing.settings import BillingSettings
from cluster.catalog import load_catalog
from cluster.labels import CONTROL_SELECTOR
from cluster.placement import cluster_capacity, deployable_models
from cluster.settings import Settings
from serve_app.ingress import Ingress
from serve_app.meter_metrics import MeterMetrics
from serve_app.models import build_model_deployment, deployment_name, model_source

APP_NAME = "darkgpu"


@serve.deployment(
    name="billing-meter",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0, "label_selector": CONTROL_SELECTOR},
)
class BillingMeter:
    """The billing actor: drains the usage stream into the SQL ledger, reaps stale holds,
    and rebuilds Redis from SQL when Redis comes back empty (`billing.meter.BillingLoop`).
    Serve restarts it if it dies; its consumer group hands a dead consumer's entries over.
    It also exports the billing metrics: spend, the stream's backlog, providers, payouts
    (`serve_app.meter_metrics`)."""

    def __init__(self, billing: dict[str, Any]) -> None:
        settings = BillingSettings(**billing)
        consumer = f"meter-{serve.get_replica_context().replica_id.unique_id}"
        self._metrics = MeterMetrics()
        self._loop = BillingLoop(
            settings.database_url,
            settings.redis_url,
            consumer=consumer,
            settings=settings,
            on_recorded=self._metrics.recorded,
        )
        self._thread = threading.Thread(target=self._loop.run, name="billing", daemon=True)
        self._thread.start()
        self._metrics.start(self._loop.engine, self._loop.redis)

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the billing loop stopped")

    def __del__(self) -> None:
        self._loop.stop()
        self._metrics.stop()


def billing_args(settings: BillingSettings) -> dict[str, Any]:
    """The billing settings, as the replicas' constructor arguments (not environment
    variables: Ray shows a runtime environment in its dashboard, and these hold secrets)."""
    args = settings.model_dump(mode="json")
    for name, value in settings:
        if isinstance(value, SecretStr):
            args[name] = value.get_secret_value()
    return args


def build_app(args: dict[str, Any] | None = None) -> Application:
    args = args or {}
    settings = Settings(**args)
    billing = billing_args(BillingSettings(**args))
    catalog = load_catalog(settings.models_file)
    models = deployable_models(catalog, cluster_capacity())
    return Ingress.bind(
        catalog,
        {m.id: build_model_deployment(m, settings, billing["redis_url"]) for m in models},
        {m.id: deployment_name(m) for m in models},
        {m.id: model_source(m, settings) for m in models},
        billing,
        BillingMeter.bind(billing),
    )
