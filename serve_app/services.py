"""What the ingress's routes share: connections and settings, made once per ingress replica.

Routes outside `ingress.py` (APIRouters included into the ingress's FastAPI app) reach them
with `Depends(services)`; `Ingress.__init__` puts them on `app.state`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis as redis_sync
import stripe
from fastapi import Request
from sqlalchemy.engine import Engine

from billing.admission import Admission, connect
from billing.db import make_engine
from billing.plans import Plans, load_plans
from billing.settings import BillingSettings
from billing.stripe_client import maybe_stripe_client
from cluster.registry import ProviderPlatform
from serve_app.gate import Gate
from serve_app.metrics import IngressMetrics


@dataclass
class Services:
    settings: BillingSettings
    db: Engine
    redis: redis_sync.Redis
    plans: Plans
    gate: Gate
    admission: Admission
    # None when DARKGPU_STRIPE_SECRET_KEY is not set: the payment routes answer 503.
    stripe: stripe.StripeClient | None = None
    # the provider registry's settings and CC verifier (serve_app/routes_providers.py)
    providers: ProviderPlatform = field(default_factory=ProviderPlatform)

    @classmethod
    def create(cls, billing: dict[str, Any], metrics: IngressMetrics | None = None) -> Services:
        settings = BillingSettings(**billing)
        plans = load_plans(settings.plans_file)
        admission = Admission(connect(settings.redis_url), plans, hold_ttl_s=settings.hold_ttl_s)
        return cls(
            settings=settings,
            db=make_engine(settings.database_url),
            redis=redis_sync.Redis.from_url(settings.redis_url),
            plans=plans,
            gate=Gate(admission, metrics),
            admission=admission,
            stripe=maybe_stripe_client(settings),
        )


def services(request: Request) -> Services:
    """FastAPI dependency: the ingress replica's services."""
    return request.app.state.services
