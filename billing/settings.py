"""Billing configuration from `DARKGPU_*` environment variables (pydantic-settings).

Defaults run everything on one machine with no setup: SQLite under the data directory,
Redis on localhost, plans from the repository's `configs/plans.toml`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PLANS_FILE = REPO_ROOT / "configs" / "plans.toml"


class BillingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DARKGPU_", extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path("~/.local/share/darkgpu").expanduser())
    database_url: str = ""  # empty: sqlite:///<data_dir>/darkgpu.db
    # The platform's own Redis: `darkgpu up` starts one there when nothing answers.
    redis_url: str = "redis://127.0.0.1:6381/0"
    plans_file: Path = DEFAULT_PLANS_FILE
    # How long a reservation may stay open before the reaper settles it as zero usage.
    hold_ttl_s: int = Field(default=1800, ge=1)

    # Stripe (billing.stripe_client). Empty secrets: payments are off and their endpoints
    # answer 503. `stripe_api_base` points the client elsewhere (a local Stripe stand-in).
    stripe_secret_key: SecretStr = SecretStr("")
    stripe_webhook_secret: SecretStr = SecretStr("")
    stripe_webhook_tolerance_s: int = Field(default=300, ge=1)
    stripe_api_base: str = ""
    checkout_success_url: str = (
        "https://console.darkgpu.ai/billing?checkout=success&session_id={CHECKOUT_SESSION_ID}"
    )
    checkout_cancel_url: str = "https://console.darkgpu.ai/billing?checkout=cancelled"
    connect_refresh_url: str = "https://console.darkgpu.ai/provider/payouts?onboarding=refresh"
    connect_return_url: str = "https://console.darkgpu.ai/provider/payouts?onboarding=done"

    @model_validator(mode="after")
    def _resolve(self) -> BillingSettings:
        self.data_dir = self.data_dir.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'darkgpu.db'}"
        plans = self.plans_file.expanduser()
        if not plans.is_absolute() and not plans.exists():
            plans = REPO_ROOT / plans
        self.plans_file = plans
        return self
