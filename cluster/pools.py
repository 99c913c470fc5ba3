"""Supply pools: one Ray cluster per trust tier, where the control plane reaches each one's
model deployments, and with what.

Ray trusts every node of a cluster (any node can run code on any other), so a `basic` node
never shares a cluster with `verified` ones: each tier's providers join its own pool
(`Pool.agent_address`, with that pool's Ray token), and the ingress sends a request to the
pool of the replica it picked. `Settings.pools` holds each pool's settings; a `Pool` adds
what is made on the local platform when they leave it unset:

- its credential, what the ingress presents to the pool's gateway (`serve_app.pool`): the
  setting, or a random one made once into `<data_dir>/<prefix>pool_token` (mode 0600);
- its Ray token, what its approved agents are given: `<data_dir>/<prefix>ray_auth_token`
  (made by `cluster.local`);

the basic pool's prefix empty (the files of the single pool before there were two), the
verified pool's `verified_`. Rotating a credential: `darkgpu down`, remove its file (or set a
new one), `darkgpu up`; rotating a pool's Ray token: the same, then its providers rejoin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.local_secrets import made_once
from core.settings import PoolSettings, Settings
from kernel.labels import TrustTier

TOKEN_FILE = "pool_token"
RAY_TOKEN_FILE = "ray_auth_token"


@dataclass(frozen=True)
class Pool:
    tier: TrustTier
    settings: PoolSettings
    data_dir: Path

    @property
    def name(self) -> str:
        return f"{self.tier.value} pool"

    @property
    def _prefix(self) -> str:
        return "" if self.tier is TrustTier.basic else f"{self.tier.value}_"

    @property
    def url(self) -> str:
        """Base URL of the pool's gateway."""
        local = f"http://{self.settings.http_host}:{self.settings.http_port}/pool"
        return (self.settings.url or local).rstrip("/")

    def credential(self) -> str:
        """What the ingress presents to the pool: the setting, else the local one (made on
        first use)."""
        configured = self.settings.token.get_secret_value()
        return configured or made_once(self.data_dir / (self._prefix + TOKEN_FILE))

    @property
    def ray_token_path(self) -> Path:
        """The pool's Ray token, which its approved agents are given."""
        path = self.settings.ray_auth_token_path
        return path.expanduser() if path else self.data_dir / (self._prefix + RAY_TOKEN_FILE)

    @property
    def agent_address(self) -> str:
        """Where its agents join: the configured address, or the local head."""
        return self.settings.cluster_address or f"{self.settings.node_ip}:{self.settings.ray_port}"


def pools(settings: Settings) -> dict[TrustTier, Pool]:
    """Every trust tier's pool."""
    data_dir = settings.resolved_data_dir
    return {tier: Pool(tier, found, data_dir) for tier, found in settings.pools.items()}
