"""The Serve application, built by one function from the configuration.

`build_app` serves `darkgpu up` and `serve deploy configs/serve.yaml` alike
(`import_path: serve_app.app:build_app`; the YAML's `args` override `DARKGPU_*` settings).
It must run connected to the cluster: which models get a deployment depends on what the
alive nodes offer (`cluster.placement`).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from cluster.catalog import load_catalog
from cluster.placement import cluster_capacity, deployable_models
from cluster.settings import Settings
from serve_app.ingress import Ingress
from serve_app.models import build_model_deployment, deployment_name

APP_NAME = "darkgpu"


def build_app(args: dict[str, Any] | None = None) -> Application:
    settings = Settings(**(args or {}))
    catalog = load_catalog(settings.models_file)
    models = deployable_models(catalog, cluster_capacity())
    return Ingress.bind(
        catalog,
        {m.id: build_model_deployment(m, settings) for m in models},
        {m.id: deployment_name(m) for m in models},
    )
