"""The Serve application, built by one function from the configuration.

`build_app` serves `darkgpu up` and `serve deploy configs/serve.yaml` alike
(`import_path: serve_app.app:build_app`; the YAML's `args` override `DARKGPU_*` settings).
The application is the inference ingress (`ingress`, `Settings.ingress_replicas` of them),
the accounts routes' replica (`accounts`: the console, sign-up, payments, providers, which the
ingress forwards there), the billing actor (`billing-meter`) and the supply reconciler
(`supply`), which live and die with it. The models are not part of it: each is an
application of its own that the reconciler deploys on the nodes that may hold it, as they
join and leave (`serve_app.supply`), so a model comes and goes without restarting the
ingress.

Generation goes from the ingress to a supply pool's own application (`pool`,
`serve_app.pool.build_pool_app`), one per trust tier, each in a Ray cluster of its own, over
HTTP (`cluster.pools`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from functools import partial
from typing import Any, cast

import ray
from ray import serve
from ray.serve import Application, Deployment

from billing.loop import BillingLoop
from cluster.catalog import load_catalog
from cluster.node_warden import NodeWarden
from cluster.pools import pools
from cluster.registry import attestation_secret, mark_stale_offline
from core.settings import Settings
from kernel.labels import CONTROL_SELECTOR, TrustTier
from serve_app.accounts import ACCOUNTS
from serve_app.ingress import INGRESS
from serve_app.meter_metrics import MeterMetrics
from serve_app.pool_admin import PoolAdmin, pool_admins
from serve_app.pool_protocol import PoolReplica
from serve_app.supply import Supply

APP_NAME = "darkgpu"


@serve.deployment(
    name="billing-meter",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0, "label_selector": CONTROL_SELECTOR},
)
class BillingMeter:
    """The billing actor: drains the usage stream into the SQL ledger, reaps stale holds,
    and rebuilds Redis from SQL when Redis comes back empty (`billing.loop.BillingLoop`).
    Serve restarts it if it dies; its consumer group hands a dead consumer's entries over.
    It also exports the billing metrics: spend, the stream's backlog, providers, payouts
    (`serve_app.meter_metrics`)."""

    def __init__(self, args: dict[str, Any]) -> None:
        settings = Settings(**args)
        consumer = f"meter-{serve.get_replica_context().replica_id.unique_id}"
        self._metrics = MeterMetrics()
        self._loop = BillingLoop(
            settings.database_url,
            settings.meter_redis_url,
            consumer=consumer,
            settings=settings,
            on_recorded=self._metrics.recorded,
        )
        # Providers silent for `offline_after_s` become `offline` (cluster.registry).
        engine = self._loop.engine
        self._loop.chores.append(
            lambda: mark_stale_offline(engine, older_than_s=settings.offline_after_s)
        )
        # Nodes with no right to be in their pool are drained (cluster.node_warden), a warden
        # per pool (its nodes and its drain, through its gateway).
        pools = pool_admins(settings)
        control = frozenset({ray.get_runtime_context().get_node_id(), *settings.control_node_ids})
        for tier, pool in pools.items():
            warden = NodeWarden(engine, control, pool.nodes, pool.drain,
                                grace_s=settings.node_join_grace_s, pool=tier)  # fmt: skip
            self._loop.chores.append(warden.tick)
        self._thread = threading.Thread(target=self._loop.run, name="billing", daemon=True)
        self._thread.start()
        # Providers serving: every pool's replicas, as its gateway lists them.
        self._metrics.start(self._loop.engine, self._loop.redis, partial(every_replica, pools))

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the billing loop stopped")

    def __del__(self) -> None:
        self._loop.stop()
        self._metrics.stop()


def every_replica(pools: Mapping[TrustTier, PoolAdmin]) -> dict[TrustTier, list[PoolReplica]]:
    """Each pool's model replicas (a pool that does not answer raises: the gauges wait)."""
    return {tier: pool.replicas().replicas for tier, pool in pools.items()}


def build_app(args: dict[str, Any] | None = None) -> Application:
    settings = Settings(**(args or {}))
    # each pool's credential travels to the ingress as an argument: its replica may run on a
    # control node without this data directory
    # (and so does the attestation challenges' key, made once under it)
    args, found = settings.as_args(), pools(settings)
    if TrustTier.basic in found:
        args["pool_token"] = found[TrustTier.basic].credential()
    if TrustTier.verified in found:
        args["verified_pool"]["token"] = found[TrustTier.verified].credential()
    args["attestation_secret"] = attestation_secret(settings)
    # `@serve.deployment` made these Deployments; mypy does not apply class decorators.
    meter, supply = cast(Deployment, BillingMeter), cast(Deployment, Supply)
    ingress = INGRESS.options(num_replicas=settings.ingress_replicas)
    return ingress.bind(
        load_catalog(settings.models_file),
        args,
        ACCOUNTS.bind(args),
        meter.bind(args),
        supply.bind(args),
    )
