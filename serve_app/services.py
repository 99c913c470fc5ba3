"""What the ingress's routes share: connections and settings, made once per ingress replica.

Routes outside `ingress.py` (APIRouters included into the ingress's FastAPI app) reach them
with `Depends(services)`; `Ingress.__init__` puts them on `app.state`.

Two Redis clients: `redis`, the money Redis (balances, holds, keys: never evicting, checked
at start by `billing.redis_server.check_money_redis`), and `state`, the state Redis (console
sessions, throttles: every key with a TTL, evictable). Nothing a visitor can make grow is
written to the money Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis as redis_sync
import stripe
from fastapi import Request
from sqlalchemy.engine import Engine

from billing.admission import Admission, connect
from billing.plans import Plans, load_plans
from billing.redis_server import check_money_redis, sync_client
from billing.stripe_client import maybe_stripe_client
from cluster.registry import ProviderPlatform
from core.db import make_engine
from core.settings import Settings
from kernel.labels import TrustTier
from serve_app.gate import Gate
from serve_app.metrics import IngressMetrics
from serve_app.pool_admin import PoolAdmin, pool_admins


@dataclass
class Services:
    settings: Settings
    db: Engine
    redis: redis_sync.Redis  # money
    state: redis_sync.Redis  # sessions, throttles
    plans: Plans
    gate: Gate
    admission: Admission
    # the provider registry's settings and CC verifier (serve_app/routes_providers.py)
    providers: ProviderPlatform
    # each tier's pool's nodes, as its gateway lists them (serve_app/routes_nodes.py)
    pools: dict[TrustTier, PoolAdmin]
    # None when DARKGPU_STRIPE_SECRET_KEY is not set: the payment routes answer 503.
    stripe: stripe.StripeClient | None = None

    @classmethod
    def create(cls, billing: dict[str, Any], metrics: IngressMetrics | None = None) -> Services:
        settings = Settings(**billing)
        check_money_redis(settings.redis_url)
        plans = load_plans(settings.plans_file)
        admission = Admission(connect(settings.redis_url), plans, hold_ttl_s=settings.hold_ttl_s)
        return cls(
            settings=settings,
            db=make_engine(settings.database_url),
            redis=sync_client(settings.redis_url),
            state=sync_client(settings.state_redis_url),
            plans=plans,
            gate=Gate(admission, metrics),
            admission=admission,
            providers=ProviderPlatform(settings),
            pools=pool_admins(settings),
            stripe=maybe_stripe_client(settings),
        )


def services(request: Request) -> Services:
    """FastAPI dependency: the ingress replica's services (`http_app.create_app` puts them on
    the app's state)."""
    found: Services = request.app.state.services
    return found
