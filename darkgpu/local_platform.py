"""The whole platform on one machine, as `darkgpu up` / `darkgpu down` run it.

Up: the SQL schema migrated (SQLite under the data directory by default), the two Redis
(money and state, `billing.redis_server`: the configured ones; where one is a local address
nothing answers on, a private server started under the data directory, with one ACL user per
role, `core.redis_users`; a money Redis that may evict keys is refused), two Ray clusters
(`cluster.local`: the supply pool's, which providers' nodes join, and the control plane's,
which nothing of a provider joins), and their Serve applications (`serve_app.deploy`: the
pool's gateway, then the platform's, which reaches the pool only over HTTP). Down:
everything up started, nothing it did not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from billing.redis_server import LocalRedis, check_money_redis, money_server, state_server
from cluster.local import LocalCluster
from core import redis_users
from core.db import migrate
from core.settings import Settings
from darkgpu.progress import Progress
from kernel.labels import TrustTier

if TYPE_CHECKING:  # imported where used: Ray reads its environment once, on import
    from serve_app.deploy import PoolDeploy


@dataclass
class LocalPlatform:
    settings: Settings

    @classmethod
    def from_env(cls) -> LocalPlatform:
        return cls(Settings())

    @property
    def cluster(self) -> LocalCluster:
        """The control plane's cluster."""
        return LocalCluster.control(self.settings)

    @property
    def pools(self) -> dict[TrustTier, LocalCluster]:
        """The supply pool's cluster of each tier the platform runs one for."""
        return {tier: LocalCluster.pool(self.settings, tier) for tier in self.settings.pools}

    def own_redis(self) -> list[LocalRedis]:
        """The private Redis servers `up` runs where the configured ones are local: the money
        Redis, then the state Redis."""
        return [server for _, server in self.own_redis_roles()]

    def own_redis_roles(self) -> list[tuple[str, LocalRedis]]:
        found = (("money", money_server(self.settings)), ("state", state_server(self.settings)))
        return [(role, server) for role, server in found if server is not None]

    def is_up(self) -> bool:
        cluster = self.cluster
        cluster.apply_env()
        from serve_app.deploy import is_deployed

        return cluster.is_running() and is_deployed(cluster.address)

    def up(self, progress: Progress) -> None:
        cluster, pools = self.cluster, self.pools
        cluster.apply_env()
        for pool in pools.values():
            pool.ensure_token()
        from serve_app.deploy import deploy

        data_dir = self.settings.resolved_data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        data_dir.chmod(0o700)  # its secrets are the control plane's: this user's alone
        starting = {role: redis.port for role, redis in self.own_redis_roles()
                    if not redis.is_running()}  # fmt: skip
        if starting:
            # servers it starts get one ACL user per role; the settings then carry them
            redis_users.ensure(self.settings.resolved_data_dir, starting)
            self.settings = Settings(**self.settings.as_args())
        for role, redis in self.own_redis_roles():
            if not redis.is_running():
                with progress.step(f"Redis ({role}) on port {redis.port}"):
                    redis.start()
        with progress.step("Money Redis checked (persistent, never evicts)"):
            check_money_redis(self.settings.redis_url)
        with progress.step("Database migrated"):
            migrate(self.settings.database_url)
        for head in (*pools.values(), cluster):
            if not head.is_running():
                with progress.step(f"Ray head ({head.name}) on {head.address}"):
                    head.start_head()
        deploys = [self._pool_deploy(tier, pool, progress) for tier, pool in pools.items()]
        try:
            heads = []
            for deploy_one, pool in zip(deploys, pools.values(), strict=True):
                with progress.step(f"Supply pool's gateway deployed ({pool.name})"):
                    heads.append(deploy_one.start())
            # each pool's head is the platform's own node there (never drained; the basic
            # one's serves the local models)
            own = [*self.settings.control_node_ids, *heads]
            settings = Settings(**{**self.settings.as_args(), "control_node_ids": own})
            with progress.step("Serve application deployed (the first start takes a few minutes)"):
                deploy(settings, cluster.address, note=progress.note)
        finally:
            for deploy_one in deploys:
                deploy_one.stop()

    def _pool_deploy(self, tier: TrustTier, pool: LocalCluster, progress: Progress) -> PoolDeploy:
        from serve_app.deploy import PoolDeploy, pool_deployment

        settings = self.settings
        if pool.user is not None and settings.local_models_dir is None:
            # its user makes and reads the local models in a folder of its own
            models = {"local_models_dir": str(pool.user.home / "models")}
            settings = Settings(**{**settings.as_args(), **models})
        return PoolDeploy(pool.process_env(), pool_deployment(settings, tier), progress.note,
                          pool.process_options())  # fmt: skip

    def down(self) -> bool:
        """Stop what `up` started; False when nothing was running."""
        cluster = self.cluster
        cluster.apply_env()
        running = False
        for pool in self.pools.values():
            if not pool.is_running():
                continue
            running = True
            from serve_app.deploy import undeploy_pool

            try:
                undeploy_pool(pool.process_env(), pool.process_options())
            finally:
                pool.stop()
        if cluster.is_running():
            running = True
            from serve_app.deploy import undeploy

            try:
                undeploy(cluster.address)
            finally:
                cluster.stop()
        for redis in self.own_redis():
            if redis.pid() is not None:
                redis.stop()
                running = True
        return running
