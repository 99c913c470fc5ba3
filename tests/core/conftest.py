"""The billing fixtures (real SQLite and PostgreSQL, real Redis) for the schema tests."""

from tests.billing import conftest as _billing

db_url = _billing.db_url
engine = _billing.engine
r = _billing.r
plans = _billing.plans
