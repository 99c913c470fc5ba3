"""The platform's settings: one object per process, from `DARKGPU_*` environment variables
over defaults that run everything on one machine with no setup (SQLite under the data
directory, a private Redis on localhost, the repository's `configs/`).

`Settings(**args)` also takes the `args` of `configs/serve.yaml`; an unknown or misspelt key
is an error (`extra="forbid"`), never silently dropped. Replicas receive the settings as
constructor arguments (`settings_args`), not as environment variables: Ray shows a runtime
environment in its dashboard, and these hold secrets.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core import redis_users
from kernel.labels import TrustTier

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
DEFAULT_PLANS_FILE = CONFIGS_DIR / "plans.toml"
# every setting's environment variable starts with it
ENV_PREFIX = "DARKGPU_"
# Which Redis user each URL setting authenticates as, on the local platform's servers.
REDIS_URL_ROLES = (
    ("redis_url", "money", "platform"),
    ("meter_redis_url", "money", "meter"),
    ("state_redis_url", "state", "platform"),
)
# The console's pages that Stripe sends a visitor back to (Checkout, Connect onboarding);
# each says what happened from its query.
RETURN_PATHS = {
    "checkout_success_url": "/console/billing?checkout=success&session_id={CHECKOUT_SESSION_ID}",
    "checkout_cancel_url": "/console/billing?checkout=cancelled",
    "connect_refresh_url": "/console/provider?onboarding=refresh",
    "connect_return_url": "/console/provider?onboarding=done",
}


class PoolSettings(BaseModel):
    """One supply pool (a Ray cluster of its own, per trust tier: `cluster.pools`): where the
    control plane reaches its gateway and with what, where providers' nodes join it, and, on
    the local platform, the head `darkgpu up` starts for it. The basic pool's are the flat
    `pool_*` settings (`Settings.pools`); the verified pool's, `verified_pool`
    (`DARKGPU_VERIFIED_POOL__RAY_PORT`, … or one JSON object in `DARKGPU_VERIFIED_POOL`)."""

    model_config = ConfigDict(extra="forbid")

    ray_port: int
    dashboard_port: int
    metrics_port: int = Field(description="Prometheus metrics of the pool's head (Serve, vLLM).")
    http_host: str = Field(
        default="127.0.0.1",
        description="Where the pool's gateway listens (its own HTTP server, with `http_port`): "
        "an address the control plane reaches.",
    )
    http_port: int
    node_ip: str = Field(
        default="127.0.0.1",
        description="The local pool's head's address (Ray's --node-ip-address): one its "
        "providers' nodes reach, on the network between them and the pool only.",
    )
    user: str = Field(
        default="",
        description="An unprivileged system user the local pool's head runs as (`darkgpu up` "
        "as root), each pool a user of its own. Every member of a pool can run code on its "
        "head: as this user, that code reads nothing of the data directory, nor any "
        "process's environment there, nor the other pool's head's. Empty: the head runs as "
        "`darkgpu up`'s own user, for a pool of the operator's own nodes only.",
    )
    url: str = Field(
        default="",
        description="Base URL of the pool's gateway; empty: the local platform's own, "
        "http://<http_host>:<http_port>/pool.",
    )
    token: SecretStr = Field(
        default=SecretStr(""),
        description="The credential the ingress presents to the pool (the gateway keeps only "
        "its SHA-256); empty: made once under the data directory (cluster.pools).",
    )
    cluster_address: str = Field(
        default="",
        description="host:port of the pool's Ray head, which its agents join, on the "
        "overlay network (e.g. 10.8.0.1:6383); empty: the local head, <node_ip>:<ray_port>.",
    )
    ray_auth_token_path: Path | None = Field(
        default=None,
        description="The pool's Ray token, which approved agents of its tier are given; "
        "unset: made once under the data directory (cluster.local). The control plane's "
        "cluster has its own.",
    )


class VerifiedPoolSettings(PoolSettings):
    """The verified tier's pool: its local head on ports of its own."""

    ray_port: int = 6384
    dashboard_port: int = 8267
    metrics_port: int = 8082
    http_port: int = 8002


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", env_nested_delimiter="__"
    )

    data_dir: Path = Field(
        default=Path("~/.local/share/darkgpu"),
        description="State of the local platform: the made model, the Ray token, SQLite, "
        "the private Redis.",
    )

    # --- money: the ledger, admission state, plans --------------------------------------
    database_url: str = ""  # empty: sqlite:///<data_dir>/darkgpu.db
    # The money Redis (balances, holds, day counters, keys, the usage stream): `darkgpu up`
    # starts one there when nothing answers. Its `maxmemory-policy` must be `noeviction` (a
    # full Redis refuses writes, never drops a balance): the platform refuses to start else.
    redis_url: str = "redis://127.0.0.1:6381/0"
    # The state Redis: console sessions and reveals, sign-up/sign-in throttles. Every key
    # there has a TTL and may be evicted. `darkgpu up` starts one there (no persistence,
    # `state_redis_maxmemory_mb` with `allkeys-lru`) when nothing answers. It may name the
    # money Redis (its noeviction then covers these keys too, which can then fill it:
    # requests refused with 503 until their TTLs pass); `up` never starts that one evicting.
    state_redis_url: str = "redis://127.0.0.1:6382/0"
    state_redis_maxmemory_mb: int = Field(default=256, ge=1)
    # Each role its own Redis user (core.redis_users): the billing actor's URL for the money
    # Redis. Empty: `redis_url`. A local URL that names no user gets the local platform's
    # credentials for its role, when `darkgpu up` made them.
    meter_redis_url: str = ""
    plans_file: Path = DEFAULT_PLANS_FILE
    # How long a reservation may stay open unextended before the reaper settles it at its
    # last checkpoint (zero usage without one); an ingress extends its live requests' holds.
    hold_ttl_s: int = Field(default=1800, ge=1)
    # How often the billing actor reaps expired holds; a stream checkpoints its usage into its
    # hold every this many tokens (or every few seconds), what a crash bills at most short.
    reap_every_s: float = Field(default=5.0, gt=0)
    checkpoint_tokens: int = Field(default=64, ge=1)

    # --- Stripe (billing.stripe_client) -------------------------------------------------
    # Empty secrets: payments are off and their endpoints answer 503. `stripe_api_base`
    # points the client elsewhere (a local Stripe stand-in).
    stripe_secret_key: SecretStr = SecretStr("")
    stripe_webhook_secret: SecretStr = SecretStr("")
    stripe_webhook_tolerance_s: int = Field(default=300, ge=1)
    stripe_api_base: str = ""
    # Where Stripe sends the visitor back (absolute URLs). Empty: the console's pages that
    # say what happened, on this platform: under `public_url`, else http://<http_host>:<http_port>
    # (`_return_urls`).
    checkout_success_url: str = ""
    checkout_cancel_url: str = ""
    connect_refresh_url: str = ""
    connect_return_url: str = ""

    @model_validator(mode="after")
    def _return_urls(self) -> Settings:
        for name, path in RETURN_PATHS.items():
            if not getattr(self, name):
                setattr(self, name, self.base_url + path)
        return self

    # --- sign-up and sign-in (serve_app.throttle, serve_app.console) --------------------
    # Reverse proxies whose X-Forwarded-For is believed (addresses or networks, e.g.
    # ["10.0.0.0/8"]); none by default: the socket peer is the client.
    trusted_proxies: list[str] = Field(default_factory=list)
    # Attempts per client IP and per network (/24, /64) in a window, before any argon2 hash.
    signup_limit_per_ip: int = Field(default=5, ge=1)
    signup_limit_per_network: int = Field(default=20, ge=1)
    signup_window_s: int = Field(default=3600, ge=1)
    signin_limit_per_ip: int = Field(default=30, ge=1)
    signin_limit_per_network: int = Field(default=120, ge=1)
    signin_window_s: int = Field(default=900, ge=1)

    # --- email verification (billing.email_verification) --------------------------------
    # Empty smtp_host: no verification (the local platform), signup credits granted at once;
    # set: they are granted when the link mailed to the address is followed.
    smtp_host: str = ""
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_starttls: bool = True
    smtp_username: str = ""
    smtp_password: SecretStr = SecretStr("")
    mail_from: str = "DarkGPU <no-reply@darkgpu.ai>"
    # Base of the links in mail; empty: http://<http_host>:<http_port>.
    public_url: str = ""
    email_link_ttl_s: int = Field(default=48 * 3600, ge=60)

    # --- the cluster and the Serve application -------------------------------------------
    models_file: Path = CONFIGS_DIR / "models.toml"
    local_models_dir: Path | None = Field(
        default=None,
        description="Where the small local models are made and read (cluster.local_model); "
        "unset: <data_dir>/models, and the local pool's user's own folder for the pool.",
    )
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
    # The supply pools: a Ray cluster per trust tier, which providers' nodes of that tier join
    # (never the control plane's); each head runs its pool's gateway (serve_app.pool), which
    # answers HTTP itself on the pool's http_host:http_port. These flat `pool_*` settings are
    # the basic pool's (`PoolSettings` says what each means); `verified_pool` holds the
    # verified pool's.
    pool_ray_port: int = 6383
    pool_dashboard_port: int = 8266
    pool_metrics_port: int = 8081
    pool_http_host: str = "127.0.0.1"
    pool_http_port: int = 8001
    pool_node_ip: str = "127.0.0.1"
    pool_user: str = ""
    verified_pool: VerifiedPoolSettings = Field(default_factory=lambda: VerifiedPoolSettings())
    pool_tiers: list[TrustTier] = Field(
        default_factory=lambda: list(TrustTier),
        min_length=1,
        description="The trust tiers this platform runs a supply pool for (each a Ray "
        "cluster of its own). A tier left out takes no provider (its agents are told no pool "
        "takes their tier) and serves no request (`none_at_tier`).",
    )
    ingress_replicas: int = Field(
        default=1,
        ge=1,
        description="Replicas of the inference ingress (each reserves one of the control "
        "nodes' CPUs); the console and account routes run in a replica of their own.",
    )
    # Off by default: on, the multi-node suite's "a request that allows more may go to either
    # provider" test failed once in three runs (p1 took none of 24 requests); not yet explained.
    serve_throughput_optimized: bool = Field(
        default=False,
        description="Ray Serve's throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED, "
        "Ray 2.56+) in every model replica and, on the head `darkgpu up` starts, in every "
        "process of it (a cluster started otherwise takes it from its nodes' environment): "
        "deployments call each other over gRPC, user code runs on the replica's event loop, "
        "request logs are buffered (Serve's Python proxy still takes HTTP) "
        "(bench/serving_overhead.py --serve-modes).",
    )
    # The basic pool's gateway, as the ingress reaches it (`PoolSettings.url`, `.token`).
    pool_url: str = ""
    pool_token: SecretStr = SecretStr("")
    pool_read_timeout_s: float = Field(
        default=300.0, gt=0, description="Longest wait for the pool's next bytes of an answer."
    )
    # How long a replica that took a request has to give its first item: a stream's first
    # event within the base, a whole answer within the base and its max_tokens at the floor
    # rate. Past it the replica stalled: the request is routed again without it
    # (serve_app.pool_protocol). Sized for an overloaded honest engine, never to be reached.
    pool_answer_base_s: float = Field(default=60.0, gt=0)
    pool_answer_floor_tokens_per_s: float = Field(default=2.0, gt=0)
    # Model deployments.
    max_ongoing_requests: int = 64
    min_replicas: int = Field(default=1, ge=1, description="Replicas each model keeps up.")
    target_ongoing_requests: int = 16
    max_replicas: int = 4
    local_kv_cache_gb: int = 1
    # The supply reconciler (serve_app.supply): how often it looks at the nodes and the
    # demand; after how long without a request a model scales to zero (0: never); how long a
    # model takes to load, told as `Retry-After` until one load has been measured.
    supply_every_s: float = Field(default=2.0, gt=0)
    scale_to_zero_after_s: float = Field(default=0.0, ge=0)
    model_load_s: int = Field(default=60, ge=1)

    # --- providers (cluster.registry) ----------------------------------------------------
    # Where the basic pool's agents join, and its Ray token (`PoolSettings.cluster_address`,
    # `.ray_auth_token_path`).
    cluster_address: str = ""
    ray_auth_token_path: Path | None = None
    attestation_secret: str = Field(
        default="",
        description="HMAC key of attestation challenges; empty: made once into "
        "<data_dir>/attestation_secret (cluster.registry). Never the Ray token's: every "
        "approved provider holds that.",
    )
    heartbeat_interval_s: int = Field(default=15, ge=1)
    offline_after_s: int = Field(default=90, ge=1)
    # The operator's own Ray nodes (control plane) besides the one the billing actor and each
    # ingress run on: the platform's `local` replicas may serve there, and they may carry the
    # control role. Any other node serves only as the provider it bound itself to with a join
    # ticket (cluster.nodes), within `node_join_grace_s` of joining, or is drained.
    control_node_ids: list[str] = Field(default_factory=list)
    node_join_grace_s: float = Field(default=120.0, gt=0)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            ipaddress.ip_network(entry.strip(), strict=False)  # ValueError names the entry
        return value

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'darkgpu.db'}"
        plans = self.plans_file.expanduser()
        if not plans.is_absolute() and not plans.exists():
            plans = REPO_ROOT / plans
        self.plans_file = plans
        self.meter_redis_url = self.meter_redis_url or self.redis_url
        if self.pool_user and self.pool_user == self.verified_pool.user:
            # a basic pool's member could read the verified head's processes and token
            raise ValueError("pool_user and verified_pool.user must be two users, one a pool")
        self._fill_redis_users()
        return self

    def _fill_redis_users(self) -> None:
        """URLs that name one of the local platform's own Redis servers (core.redis_users)
        and no user authenticate as their role's user there."""
        passwords = redis_users.load(self.data_dir)
        if passwords is None:
            return
        own = redis_users.ports(self.data_dir)
        for name, server, user in REDIS_URL_ROLES:
            url = getattr(self, name)
            port = redis_users.port_of(url)
            if port is None or redis_users.names_user(url):
                continue
            if own.get(server) != port and own.get("money") == port:
                server = "money"  # the state keys share the money server, and its users
            if own.get(server) == port:
                setattr(self, name, redis_users.with_user(url, user, passwords[server][user]))

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir

    @property
    def resolved_local_models_dir(self) -> Path:
        return (self.local_models_dir or self.data_dir / "models").expanduser()

    @property
    def base_url(self) -> str:
        """This platform's public base URL, as the operator configured it (never a request's
        Host header): `public_url`, else http://<http_host>:<http_port>."""
        return (self.public_url or f"http://{self.http_host}:{self.http_port}").rstrip("/")

    @property
    def api_url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}/v1"

    @property
    def pools(self) -> dict[TrustTier, PoolSettings]:
        """The supply pool of each tier in `pool_tiers`: the basic one's from the flat
        `pool_*` settings."""
        basic = PoolSettings(
            ray_port=self.pool_ray_port,
            dashboard_port=self.pool_dashboard_port,
            metrics_port=self.pool_metrics_port,
            http_host=self.pool_http_host,
            http_port=self.pool_http_port,
            node_ip=self.pool_node_ip,
            user=self.pool_user,
            url=self.pool_url,
            token=self.pool_token,
            cluster_address=self.cluster_address,
            ray_auth_token_path=self.ray_auth_token_path,
        )
        found = {TrustTier.basic: basic, TrustTier.verified: self.verified_pool}
        return {tier: found[tier] for tier in TrustTier if tier in self.pool_tiers}

    def as_args(self) -> dict[str, Any]:
        """The settings as the replicas' constructor arguments, secrets in clear (they cross
        to the replicas as arguments, never as environment variables)."""
        args = self.model_dump(mode="json")
        for name, value in self:
            if isinstance(value, SecretStr):
                args[name] = value.get_secret_value()
        args["verified_pool"]["token"] = self.verified_pool.token.get_secret_value()
        return args
