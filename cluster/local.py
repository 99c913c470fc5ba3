"""The local Ray clusters of `darkgpu up` / `darkgpu down`, for a development machine or CI:
two, as DESIGN's two planes are.

The control plane's (`LocalCluster.control`): one head, labelled the control node
(`darkgpu.io/role=control`: the ingress, the billing actor, the console and the supply
reconciler run there), its Ray token under the data directory as `control_ray_auth_token`,
which no provider is ever given. Nothing of a provider joins it.

The supply pools' (`LocalCluster.pool`, one per trust tier: `cluster.pools`): each a head of
its own ports and token (`Pool.ray_token_path`: what an approved provider's agent of its tier
is given), labelled as the pool's control node (its gateway runs there). The basic pool's
head is also a provider node of provider `local` (tier `basic`), offering its GPUs' VRAM as
the `vram_gb` resource and every catalog model, so the same placement rules apply as on a
real pool; the verified pool's serves nothing (the operator's machine is not attested).
Providers' nodes join their tier's pool, and only it, at its `node_ip`. Every member of a
pool can run code on its head: the head's processes get none of the operator's `DARKGPU_*`
environment, and where the pool's `user` is set they run as that unprivileged user
(`cluster.pool_user`), who reads nothing of the data directory. Ray's token authentication
is on in all three; each token file is mode 0600.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from functools import cached_property
from pathlib import Path
from typing import Any

from cluster.catalog import load_catalog
from cluster.gpu import local_gpus
from cluster.pool_user import PoolUser
from cluster.pools import Pool, pools
from cluster.processes import forget_address, session_of, stop_session
from core.settings import ENV_PREFIX, Settings
from kernel.labels import (
    CONTROL_SELECTOR,
    LOCAL_PROVIDER_ID,
    VRAM_RESOURCE,
    NodeIdentity,
    TrustTier,
    format_labels,
    model_resources,
)

CONTROL_TOKEN_FILE = "control_ray_auth_token"


class LocalCluster:
    def __init__(self, settings: Settings, of_pool: Pool | None = None) -> None:
        self.settings = settings
        self.data_dir = settings.resolved_data_dir
        self.of_pool = of_pool
        if of_pool is None:
            self.port, self.host = settings.ray_port, "127.0.0.1"
            self.dashboard_port, self.metrics_port = settings.dashboard_port, settings.metrics_port
            self.token_path = self.data_dir / CONTROL_TOKEN_FILE
        else:
            own = of_pool.settings
            self.port, self.host = own.ray_port, own.node_ip
            self.dashboard_port, self.metrics_port = own.dashboard_port, own.metrics_port
            self.token_path = of_pool.ray_token_path

    @classmethod
    def control(cls, settings: Settings) -> LocalCluster:
        return cls(settings)

    @classmethod
    def pool(cls, settings: Settings, tier: TrustTier = TrustTier.basic) -> LocalCluster:
        """The head of a trust tier's supply pool."""
        return cls(settings, pools(settings)[tier])

    @property
    def is_pool(self) -> bool:
        return self.of_pool is not None

    @property
    def name(self) -> str:
        return self.of_pool.name if self.of_pool is not None else "control plane"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @cached_property
    def user(self) -> PoolUser | None:
        """The unprivileged user the pool's head runs as, if one is set."""
        if self.of_pool is None or not self.of_pool.settings.user:
            return None
        return PoolUser.named(self.of_pool.settings.user, self.port)

    def env(self) -> dict[str, str]:
        """Environment for every process that talks to this cluster."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ADDRESS": self.address,
            **serve_mode_env(self.settings),
        }

    def process_env(self) -> dict[str, str]:
        """The whole environment of this cluster's own processes (its head's, the pool's
        deploy). The pool's: none of the platform's settings (the operator's Stripe key,
        database URL, … when set as DARKGPU_* variables), since every member of the pool can
        run code among them; what the pool's deployments need, they are bound with."""
        env = {**os.environ, **self.env()}
        if self.is_pool:
            env = {name: value for name, value in env.items() if not name.startswith(ENV_PREFIX)}
        if self.user is not None:
            env.update(self.user.env())
        return env

    def process_options(self) -> dict[str, Any]:
        """`subprocess` arguments for this cluster's own processes: as the pool's user."""
        return self.user.process_options() if self.user is not None else {}

    def apply_env(self) -> None:
        """Point this process at the cluster. Before Ray is imported: Ray reads these once."""
        self.ensure_token()
        os.environ.update(self.env())

    def is_running(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def ensure_token(self) -> None:
        self.token_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.token_path.exists():
            fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))

    def _node_spec(self) -> tuple[dict[str, str], dict[str, float]]:
        """The head's labels and resources: the control role; in the basic pool, also the
        platform's own provider node, which may serve any catalog model that fits it."""
        if self.of_pool is None or self.of_pool.tier is not TrustTier.basic:
            return dict(CONTROL_SELECTOR), {}
        gpus = local_gpus()
        identity = NodeIdentity(
            provider_id=LOCAL_PROVIDER_ID,
            trust_tier=TrustTier.basic,
            gpu_model=gpus[0].name.replace(" ", "_") if gpus else None,
        )
        resources: dict[str, float] = {VRAM_RESOURCE: sum(g.vram_gb for g in gpus)} if gpus else {}
        catalog = load_catalog(self.settings.models_file)
        resources.update(model_resources(m.id for m in catalog.models))
        return {**identity.labels(), **CONTROL_SELECTOR}, resources

    def start_head(self) -> None:
        self.ensure_token()
        labels, resources = self._node_spec()
        command = [
            _ray_executable(), "start", "--head",
            "--port", str(self.port),
            "--node-ip-address", self.host,
            "--num-cpus", str(self.settings.num_cpus),
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port),
            "--metrics-export-port", str(self.metrics_port),
            "--labels", format_labels(labels),
            "--resources", json.dumps(resources),
            "--disable-usage-stats",
        ]  # fmt: skip
        if self.user is not None:
            self.user.prepare(self.token_path)
            command += ["--temp-dir", str(self.user.ray_temp_dir)]
        env = self.process_env()
        env.pop("RAY_ADDRESS")
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL,
                       **self.process_options())  # fmt: skip

    def stop(self) -> None:
        """End this cluster's processes only (`ray stop` would end every cluster here)."""
        session = session_of(self.port)
        if session is not None:
            stop_session(session)
        forget_address(self.port)


def serve_mode_env(settings: Settings) -> dict[str, str]:
    """Ray Serve's throughput-optimized mode on or off (`Settings.serve_throughput_optimized`).
    Serve reads it once, when a process imports it: the driver that deploys, every process the
    head starts, and (through their runtime environment) the model replicas on provider nodes
    all get the same value."""
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if settings.serve_throughput_optimized else "0"}


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")
