"""Platform settings: `DARKGPU_*` environment variables over defaults that run on one machine."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DARKGPU_", extra="ignore")

    data_dir: Path = Field(
        default=Path("~/.local/share/darkgpu"),
        description="State of the local platform: the made model, the Ray session, pid files.",
    )
    models_file: Path = CONFIGS_DIR / "models.toml"

    # The local Ray head. Its GCS is not on 6379, where Redis listens on these machines.
    ray_port: int = 6380
    dashboard_port: int = 8265
    metrics_port: int = Field(
        default=8080, description="Prometheus metrics of Ray, Serve, vLLM and the ingress."
    )
    num_cpus: int = Field(
        default=8,
        description="Logical CPUs the head declares; a count for scheduling, not cores.",
    )

    http_host: str = "127.0.0.1"
    http_port: int = 8000

    # Model deployments.
    max_ongoing_requests: int = 64
    min_replicas: int = Field(default=1, ge=1, description="Replicas each model keeps up.")
    target_ongoing_requests: int = 16
    max_replicas: int = 4
    local_kv_cache_gb: int = 1

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def api_url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}/v1"


@lru_cache
def get_settings() -> Settings:
    return Settings()
