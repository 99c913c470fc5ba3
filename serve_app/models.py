"""Model deployments: one Ray Serve LLM `LLMServer` (vLLM) deployment per deployed model.

`ProviderLLMServer` is a thin shell over Ray Serve LLM's server: it reads its node's labels
once (which provider's GPU it runs on, that provider's trust tier and price floor), and
reports them, its load and whether its node is draining (`ray drain-node`: the provider's
window ended or its owner wants the GPU back) to the request router through routing stats.
It announces its provider as the first item of every response stream, so the pool's gateway
can tell the ingress who served a request (`x-darkgpu-provider`), billed at that provider's
price, without another hop. The pool's gateway asks for the same stats and lists them to the
ingress (`serve_app.pool_replicas`), which reads them before routing (and corrects them with
the provider registry's terms). A replica is handed no Redis, database or other URL of the
control plane: it runs on its provider's machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import json
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any, cast

import ray
from ray import serve
from ray.serve import Application
from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from cluster.catalog import LOCAL_SOURCE_PREFIX, CatalogModel
from cluster.local import serve_mode_env
from cluster.local_model import ensure_local_model
from cluster.placement import replica_bundles
from cluster.ray_internals import DrainingNodes, with_code_version
from cluster.supply import ModelSupply
from core.settings import Settings
from kernel.labels import NodeIdentity
from serve_app.pool_protocol import ServedBy

logger = logging.getLogger("darkgpu.models")

ROUTER_CLASS = "serve_app.router:ProviderRequestRouter"
MODEL_APP_PREFIX = "model-"
ROUTING_STATS_PERIOD_S = 1
DRAIN_CHECK_PERIOD_S = 1.0


class ProviderLLMServer(LLMServer):
    # Serve awaits an async constructor (LLMServer's own is one); mypy knows no such thing.
    async def __init__(self, llm_config: LLMConfig, **kwargs: Any) -> None:  # type: ignore[misc]
        await super().__init__(llm_config, **kwargs)
        # Ray 2.60 annotates the labels' values as lists; they are the strings `ray start
        # --labels` set.
        labels = cast(Mapping[str, str], ray.get_runtime_context().get_node_labels())
        self._node = NodeIdentity.from_labels(labels)
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._node_id = ray.get_runtime_context().get_node_id()
        self._gcs = DrainingNodes(ray.get_runtime_context().gcs_address)
        self._draining = False
        self._drain_checked = 0.0
        self._ongoing = 0

    async def record_routing_stats(self) -> dict[str, Any]:
        return {
            "provider_id": self._node.provider_id,
            "trust_tier": self._node.trust_tier.value,
            "price_floor_pct": self._node.price_floor_pct,
            "gpu_model": self._node.gpu_model,
            "ongoing": self._ongoing,
            "draining": await self._node_draining(),
        }

    async def _node_draining(self) -> bool:
        """Whether this replica's node is being drained (read from the GCS, once a second);
        a draining replica takes no new requests, Serve moves it to another node."""
        now = time.monotonic()
        if self._draining or now - self._drain_checked < DRAIN_CHECK_PERIOD_S:
            return self._draining
        self._drain_checked = now
        try:
            nodes = await asyncio.to_thread(self._gcs.node_ids)
        except Exception as exc:  # noqa: BLE001 - keep the last answer
            logger.warning("reading draining nodes failed: %r", exc)
            return self._draining
        self._draining = self._node_id in nodes
        return self._draining

    # The pool's gateway hands on the ingress's request as JSON, unread (`serve_app.pool`):
    # parsed here, on the replica's own machine.
    async def chat(self, request: Any, raw_request_info: Any = None) -> AsyncGenerator[Any, None]:
        if isinstance(request, str):
            request = ChatCompletionRequest.model_validate_json(request)
        return self._announced(await super().chat(request, raw_request_info))

    async def completions(
        self, request: Any, raw_request_info: Any = None
    ) -> AsyncGenerator[Any, None]:
        if isinstance(request, str):
            request = CompletionRequest.model_validate_json(request)
        return self._announced(await super().completions(request, raw_request_info))

    async def _announced(self, stream: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
        self._ongoing += 1
        try:
            yield ServedBy(
                self._node.provider_id,
                self._node.trust_tier.value,
                self._replica,
                self._node.price_floor_pct,
            )
            async for item in stream:
                yield item
        finally:
            self._ongoing -= 1
            await stream.aclose()


def model_source(model: CatalogModel, settings: Settings) -> str:
    """Where the weights and tokenizer come from: for a local model (`local:<name>`), the
    folder of the one by that name, made in `Settings.local_models_dir`."""
    if model.is_local:
        name = model.source.removeprefix(LOCAL_SOURCE_PREFIX)
        return str(ensure_local_model(settings.resolved_local_models_dir, name))
    return model.source


def llm_config_for(
    model: CatalogModel, settings: Settings, supply: ModelSupply | None = None
) -> LLMConfig:
    """The model's Serve LLM config; its replicas between `supply`'s bounds (the supply
    reconciler's, `cluster.supply`), or the settings' where none is given."""
    supply = supply or ModelSupply(
        settings.min_replicas, max(settings.max_replicas, settings.min_replicas)
    )
    engine_kwargs: dict[str, Any] = {
        "max_model_len": model.context_length,
        "tensor_parallel_size": model.tensor_parallel_size,
    }
    # Serve's mode as on the platform's own processes, whatever the provider's node was
    # started with (`cluster.local.serve_mode_env`)
    env_vars = serve_mode_env(settings)
    source = model_source(model, settings)
    if model.is_local:
        engine_kwargs.update(dtype="bfloat16", enforce_eager=True)
        env_vars["VLLM_CPU_KVCACHE_SPACE"] = str(settings.local_kv_cache_gb)
    else:
        if model.quantization in {"awq", "gptq", "fp8"}:
            engine_kwargs["quantization"] = model.quantization
    return LLMConfig(
        model_loading_config={"model_id": model.id, "model_source": source},
        engine_kwargs=engine_kwargs,
        placement_group_config={"bundles": replica_bundles(model), "strategy": "PACK"},
        runtime_env={"env_vars": env_vars},
        # Ray Serve LLM batches stream chunks every 50 ms by default: that is added
        # straight onto time-to-first-token. Off.
        experimental_configs={"stream_batching_interval_ms": 0},
        deployment_config={
            "max_ongoing_requests": settings.max_ongoing_requests,
            # Its defaults (1e9 ongoing requests per replica) never scale up.
            "autoscaling_config": {
                "min_replicas": supply.min_replicas,
                "initial_replicas": supply.min_replicas,
                "max_replicas": supply.max_replicas,
                "target_ongoing_requests": settings.target_ongoing_requests,
                # The floor drops to 0 only once the model had no request for
                # `scale_to_zero_after_s` (`cluster.supply`): that silence is the delay.
                "downscale_to_zero_delay_s": 0,
            },
            "request_router_config": {
                "request_router_class": ROUTER_CLASS,
                "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
            },
        },
    )


def deployment_name(model: CatalogModel) -> str:
    return "llm-" + model.id.replace(".", "_")


def model_app_name(model: CatalogModel) -> str:
    """Each model is a Serve application of its own: deploying or removing one restarts
    nothing else (the ingress finds it by name, `serve.get_deployment_handle`)."""
    return MODEL_APP_PREFIX + model.id.replace(".", "_")


def deployment_version(config: LLMConfig) -> str:
    """The deployment's code version: everything but its replica bounds. Serve restarts the
    replicas of a deployment whose version changed (a deployment without one gets a random
    one on every deploy), so that the supply reconciler's new bounds change only the
    autoscaler's (a light update, no replica restarted)."""
    fixed = config.model_dump()  # holds classes (the request router's): compared by name
    fixed.get("deployment_config", {}).pop("autoscaling_config", None)
    text = json.dumps([fixed, darkgpu_version()], sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def darkgpu_version() -> str:
    try:
        return importlib.metadata.version("darkgpu")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def build_model_deployment(
    model: CatalogModel, settings: Settings, supply: ModelSupply | None = None
) -> Application:
    """A bound Serve deployment of one catalog model, with its replicas between `supply`'s
    bounds."""
    config = llm_config_for(model, settings, supply)
    app = build_llm_deployment(
        config,
        name_prefix="",
        override_serve_options={"name": deployment_name(model)},
        deployment_cls=ProviderLLMServer,
    )
    return with_code_version(app, deployment_version(config))
