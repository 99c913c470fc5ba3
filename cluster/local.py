"""The local Ray head of `darkgpu up` / `darkgpu down`, for a development machine or CI.

The head is labelled like a provider node (provider `local`, tier `basic`), and as the
control node (`darkgpu.io/role=control`: the ingress and the billing actor run only there),
and offers its
GPUs' VRAM as the `vram_gb` resource, so the same placement rules apply as on a real
cluster. Ray's token authentication is on; the token lives under the data directory (0600).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from cluster.catalog import load_catalog
from cluster.gpu import local_gpus
from cluster.processes import forget_address, session_of, stop_session
from core.settings import Settings
from kernel.labels import (
    CONTROL_SELECTOR,
    LOCAL_PROVIDER_ID,
    VRAM_RESOURCE,
    NodeIdentity,
    TrustTier,
    format_labels,
    model_resources,
)


class LocalCluster:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = settings.resolved_data_dir

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.settings.ray_port}"

    @property
    def token_path(self) -> Path:
        return self.data_dir / "ray_auth_token"

    def env(self) -> dict[str, str]:
        """Environment for every process that talks to this cluster's control plane."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ADDRESS": self.address,
            **serve_mode_env(self.settings),
        }

    def apply_env(self) -> None:
        """Point this process at the cluster. Before Ray is imported: Ray reads these once."""
        self._ensure_token()
        os.environ.update(self.env())

    def is_running(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.settings.ray_port), timeout=1):
                return True
        except OSError:
            return False

    def _ensure_token(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.token_path.exists():
            fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))

    def start_head(self) -> None:
        self._ensure_token()
        gpus = local_gpus()
        identity = NodeIdentity(
            provider_id=LOCAL_PROVIDER_ID,
            trust_tier=TrustTier.basic,
            gpu_model=gpus[0].name.replace(" ", "_") if gpus else None,
        )
        resources: dict[str, float] = {VRAM_RESOURCE: sum(g.vram_gb for g in gpus)} if gpus else {}
        # the platform's own node may serve any catalog model that fits it
        catalog = load_catalog(self.settings.models_file)
        resources.update(model_resources(m.id for m in catalog.models))
        command = [
            _ray_executable(), "start", "--head",
            "--port", str(self.settings.ray_port),
            "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(self.settings.num_cpus),
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.settings.dashboard_port),
            "--metrics-export-port", str(self.settings.metrics_port),
            "--labels", format_labels({**identity.labels(), **CONTROL_SELECTOR}),
            "--resources", json.dumps(resources),
            "--disable-usage-stats",
        ]  # fmt: skip
        env = {**os.environ, **self.env()}
        env.pop("RAY_ADDRESS")
        # Serve's HTTP server (its proxy, or the ingress replica in throughput-optimized
        # mode) is uvicorn, which by default takes the client's address from
        # X-Forwarded-For when the peer is loopback: a local client could then be anyone to
        # the sign-up throttles. The platform decides whom to believe (Settings.trusted_proxies),
        # so uvicorn believes nobody. Ray's processes on this node inherit it.
        env["FORWARDED_ALLOW_IPS"] = ""
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        """End this cluster's processes only (`ray stop` would end every cluster here)."""
        session = session_of(self.settings.ray_port)
        if session is not None:
            stop_session(session)
        forget_address(self.settings.ray_port)


def serve_mode_env(settings: Settings) -> dict[str, str]:
    """Ray Serve's throughput-optimized mode on or off (`Settings.serve_throughput_optimized`).
    Serve reads it once, when a process imports it: the driver that deploys, every process the
    head starts, and (through their runtime environment) the model replicas on provider nodes
    all get the same value."""
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if settings.serve_throughput_optimized else "0"}


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")
