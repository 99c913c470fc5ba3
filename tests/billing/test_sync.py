"""SQL first, then Redis (billing.sync): a committed change reaches a Redis that holds billing
state as its own update, and an empty Redis as a rebuild from SQL, never as both."""

import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from billing import accounts as svc
from billing import ledger, sync
from billing.plans import Plans
from kernel import redis_keys as rk
from kernel.tokens import hash_key
from tests.billing.conftest import USD, make_customer, redis_int


def test_a_ready_redis_gets_the_update(engine: Engine, r: redis.Redis, plans: Plans) -> None:
    make_customer(engine, r, plans)  # the first write found Redis empty and rebuilt it
    assert r.exists(rk.READY)
    updated: list[redis.Redis] = []
    sync.after_commit(engine, r, updated.append)
    assert updated == [r]


def test_an_empty_redis_is_rebuilt_from_sql_instead(
    engine: Engine, r: redis.Redis, plans: Plans
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    r.flushdb()  # Redis lost everything
    svc.grant_credits(engine, r, account_id=c.account_id, amount_nusd=USD)
    assert r.exists(rk.READY)
    with Session(engine) as session:
        sql = ledger.balance(session, ledger.customer_credits(c.account_id))
    assert sql == 2 * USD
    assert redis_int(r, rk.balance(c.account_id)) == sql  # the grant counted once, not twice
    assert r.hget(rk.api_key(hash_key(c.key)), "account") == str(c.account_id).encode()
    updated: list[redis.Redis] = []
    r.delete(rk.READY)
    assert not sync.ready_or_rebuilt(engine, r)
    sync.after_commit(engine, r, updated.append)  # ready again: the update applies
    assert updated == [r]


def test_no_redis_no_update(engine: Engine) -> None:
    updated: list[redis.Redis] = []
    sync.after_commit(engine, None, updated.append)
    assert updated == [] and not sync.ready_or_rebuilt(engine, None)
