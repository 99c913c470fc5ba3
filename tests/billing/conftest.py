"""Billing test fixtures: a real Redis (a test database, flushed around each test), real
SQLite (a temporary file) and real PostgreSQL (a fresh schema per test)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis
from sqlalchemy import Engine, text

from billing import accounts as svc
from billing.admission import Admission
from billing.meter import UsageMeter
from billing.plans import Plans, load_plans
from cluster.catalog import CatalogModel
from core.db import make_engine, migrate
from kernel.money import NANO_PER_USD as USD

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("DARKGPU_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get(
    "DARKGPU_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

# 1,000 nUSD per input token and 2,000 per output token: $1 / $2 per 1M tokens.
MODEL = CatalogModel.model_validate(
    {
        "id": "test-model",
        "source": "local:test",
        "input_usd_per_1m": "1",
        "output_usd_per_1m": "2",
        "min_vram_gb": 0,
        "context_length": 4096,
        "quantization": "bf16",
        "class": "local",
    }
)
IN, OUT = MODEL.input_nusd_per_token, MODEL.output_nusd_per_token


def _postgres_url(schema: str) -> str:
    sep = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'core.db'}"
        return
    schema = "billing_test_" + uuid.uuid4().hex[:12]
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield _postgres_url(schema)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    """For tests of Redis logic, where SQL only sets the accounts up."""
    eng = make_engine(f"sqlite:///{tmp_path / 'setup.db'}")
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def r() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
async def ar(r: redis.Redis) -> AsyncIterator[aredis.Redis]:
    client = aredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
def plans() -> Plans:
    return load_plans(REPO / "configs" / "plans.toml")


@pytest.fixture
def admission(ar: aredis.Redis, plans: Plans) -> Admission:
    return Admission(ar, plans, hold_ttl_s=600)


@dataclass
class Customer:
    account_id: int
    key: str
    key_id: int


def make_customer(
    engine: Engine,
    r: redis.Redis,
    plans: Plans,
    *,
    plan: str = "paid",
    usd: int = 0,
    email: str | None = None,
    tokens_per_day: int | None = None,
    rpm: int | None = None,
) -> Customer:
    info = svc.create_account(
        engine, r, plans, email=email or f"{uuid.uuid4().hex[:10]}@example.com", plan=plan
    )
    if usd:
        svc.grant_credits(engine, r, account_id=info.id, amount_nusd=usd * USD)
    if tokens_per_day is not None or rpm is not None:
        svc.set_limits(
            engine,
            r,
            account_id=info.id,
            tokens_per_day=tokens_per_day if tokens_per_day is not None else svc.UNSET,
            requests_per_minute=rpm if rpm is not None else svc.UNSET,
        )
    key = svc.create_key(engine, r, account_id=info.id)
    assert key.key is not None
    return Customer(info.id, key.key, key.id)


def redis_int(r: redis.Redis, key: str) -> int:
    return int(r.get(key) or 0)


@pytest.fixture
def meter(engine: Engine, r: redis.Redis) -> UsageMeter:
    return UsageMeter(engine, r, consumer="test-meter")
