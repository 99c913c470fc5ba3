"""The whole platform on one machine, as `darkgpu up` / `darkgpu down` run it.

Up: the SQL schema migrated (SQLite under the data directory by default), Redis (the
configured one; where that is a local address nothing answers on, a private Redis started
under the data directory), a Ray head (`cluster.local`), and the Serve application
(`serve_app.deploy`). Down: everything up started, nothing it did not.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from billing.db import migrate
from billing.redis_server import LocalRedis
from billing.settings import BillingSettings
from cluster.local import LocalCluster
from cluster.settings import Settings

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class LocalPlatform:
    settings: Settings
    billing: BillingSettings

    @classmethod
    def from_env(cls) -> LocalPlatform:
        return cls(Settings(), BillingSettings())

    @property
    def cluster(self) -> LocalCluster:
        return LocalCluster(self.settings)

    def own_redis(self) -> LocalRedis | None:
        """The private Redis `up` runs when the configured one is local and not running."""
        url = urlsplit(self.billing.redis_url)
        if url.hostname not in LOCAL_HOSTS or not url.port:
            return None
        return LocalRedis(self.settings.resolved_data_dir / "redis", url.port)

    def is_up(self) -> bool:
        cluster = self.cluster
        cluster.apply_env()
        from serve_app.deploy import is_deployed

        return cluster.is_running() and is_deployed(cluster.address)

    def up(self, say=print) -> None:
        cluster = self.cluster
        cluster.apply_env()
        from serve_app.deploy import deploy

        self.settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
        redis = self.own_redis()
        if redis is not None and not redis.is_running():
            say(f"Starting Redis on {redis.url} ...")
            redis.start()
        migrate(self.billing.database_url)
        if not cluster.is_running():
            say(f"Starting the Ray head on {cluster.address} ...")
            cluster.start_head()
        say("Deploying the Serve application (the first start takes a few minutes) ...")
        deploy(self.settings, cluster.address, self.billing)

    def down(self) -> bool:
        """Stop what `up` started; False when nothing was running."""
        cluster = self.cluster
        cluster.apply_env()
        running = cluster.is_running()
        if running:
            from serve_app.deploy import undeploy

            try:
                undeploy(cluster.address)
            finally:
                cluster.stop()
        redis = self.own_redis()
        if redis is not None and redis.pid() is not None:
            redis.stop()
            running = True
        return running
