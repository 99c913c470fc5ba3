"""The billing fixtures (real SQLite and PostgreSQL, real Redis) for the registry tests, and
admission and the meter for the market's (usage rows made as the platform makes them)."""

from tests.billing import conftest as _billing

db_url = _billing.db_url
engine = _billing.engine
r = _billing.r
plans = _billing.plans
ar = _billing.ar
admission = _billing.admission
meter = _billing.meter
