"""The account's default trust tier as the ingress reads it: from Redis, cached per key."""

from __future__ import annotations

import redis
from sqlalchemy import Engine

from billing import accounts as svc
from billing.admission import Admission
from billing.plans import Plans
from kernel.labels import TrustTier
from serve_app.account_tiers import AccountTiers
from tests.billing import conftest as billing
from tests.billing.conftest import make_customer

# the billing tests' fixtures: a real Redis (a test database), SQLite and PostgreSQL
db_url, engine, r, ar = billing.db_url, billing.engine, billing.r, billing.ar
plans, admission = billing.plans, billing.admission


async def test_the_tier_is_read_once_then_cached_for_a_few_seconds(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    customer = make_customer(engine, r, plans)
    svc.set_default_tier(engine, r, account_id=customer.account_id, tier="verified")
    tiers = AccountTiers(admission, ttl_s=60)
    assert await tiers.default_for(customer.key) is TrustTier.verified
    svc.set_default_tier(engine, r, account_id=customer.account_id, tier=None)
    assert await tiers.default_for(customer.key) is TrustTier.verified  # cached
    fresh = AccountTiers(admission, ttl_s=0)
    assert await fresh.default_for(customer.key) is None
    assert await fresh.default_for(None) is None
    assert await fresh.default_for("dgpu-unknown") is None
