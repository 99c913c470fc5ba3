"""The pool's side of the supply plan: a Serve application per catalog model, deployed,
re-bounded or deleted as the control plane's reconciler asks (`PUT <pool>/models`,
`serve_app.pool_protocol`; the reconciler is `serve_app.supply`).

The reconciler sends the whole set it wants each turn (model id -> its replica bounds); the
pool deploys each model whose bounds changed (`serve_app.models.model_app_name`: adding or
removing one restarts nothing else), and first deletes those no longer wanted, which frees
the GPUs the others may need. A deploy that changes only the bounds keeps the replicas (the
code version is fixed by the config: `serve_app.models.deployment_version`).

The gateway builds the models' deployments from `MODEL_SETTINGS` only, the settings a model
replica's config is made of: it is bound with those and nothing else of the control plane's
settings (no database, Redis or Stripe secret reaches the pool's cluster).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ray import serve

from cluster.catalog import Catalog, CatalogModel
from cluster.supply import ModelSupply
from core.settings import Settings
from serve_app.models import MODEL_APP_PREFIX, build_model_deployment, model_app_name

logger = logging.getLogger("darkgpu.pool")

# What a model replica's config is made of (`serve_app.models.llm_config_for`)
MODEL_SETTINGS = ("local_models_dir", "local_kv_cache_gb", "max_ongoing_requests",
                  "target_ongoing_requests", "serve_throughput_optimized",
                  "min_replicas", "max_replicas")  # fmt: skip


def model_settings(args: Mapping[str, Any]) -> dict[str, Any]:
    return {name: args[name] for name in MODEL_SETTINGS if name in args}


def deploy_model(model: CatalogModel, supply: ModelSupply, settings: Settings) -> None:
    """Deploy (or update the bounds of) the model's own application; returns once Serve has
    taken it, before its replicas start."""
    app = build_model_deployment(model, settings, supply)
    target = serve.RunTarget(app, name=model_app_name(model), route_prefix=None)
    serve.run_many([target], wait_for_applications_running=False)


def delete_model(app_name: str) -> None:
    serve.delete(app_name, _blocking=False)


def model_apps() -> set[str]:
    """The model applications Serve runs now."""
    return {name for name in serve.status().applications if name.startswith(MODEL_APP_PREFIX)}


class ModelApplier:
    """Serve's model applications made to match what the reconciler wants. Serve's calls are
    parameters, so that tests can drive it against a recorded Serve."""

    def __init__(
        self,
        catalog: Catalog,
        settings: Settings,
        *,
        deploy: Callable[[CatalogModel, ModelSupply, Settings], None] = deploy_model,
        delete: Callable[[str], None] = delete_model,
        running_apps: Callable[[], set[str]] = model_apps,
    ) -> None:
        self._catalog = catalog
        self._settings = settings
        self._deploy = deploy
        self._delete = delete
        self._running_apps = running_apps
        self._lock = threading.Lock()
        self.applied: dict[str, ModelSupply] | None = None  # None: not read from Serve yet

    def apply(self, wanted: Mapping[str, ModelSupply]) -> None:
        """Blocking (Serve's calls): call it from a thread. `wanted`: model id -> bounds,
        catalog models only (`pool_protocol.parse_models`)."""
        with self._lock:
            self._apply(wanted)

    def _apply(self, wanted: Mapping[str, ModelSupply]) -> None:
        if self.applied is None:  # first call: what an earlier pool left running
            apps = self._running_apps()
            self.applied = {}
            for model in self._catalog.models:
                if model_app_name(model) in apps:
                    self.applied[model.id] = ModelSupply(-1, -1)  # unknown: deploy again
        for model in self._catalog.models:  # first what frees GPUs for the others
            if model.id not in wanted and model.id in self.applied:
                logger.info("removing %s: no node may serve it, or none is free", model.id)
                self._delete(model_app_name(model))
                del self.applied[model.id]
        for model in self._catalog.models:
            supply = wanted.get(model.id)
            if supply is not None and supply != self.applied.get(model.id):
                logger.info("deploying %s with %s", model.id, supply)
                self._deploy(model, supply, self._settings)
                self.applied[model.id] = supply
