import pytest
import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from billing import accounts as svc
from billing import ledger
from billing.admission import Admission
from billing.plans import Plans
from core.schema import LedgerTransfer
from kernel import redis_keys as rk
from kernel.tokens import hash_key
from tests.billing.conftest import MODEL, USD, make_customer, redis_int


def test_free_account_gets_ten_dollars_once(engine: Engine, r: redis.Redis, plans: Plans) -> None:
    info = svc.create_account(engine, r, plans, email=" Alice@Example.com ")
    assert (info.email, info.plan, info.status) == ("alice@example.com", "free", "active")
    assert info.balance_nusd == 10 * USD
    assert redis_int(r, rk.balance(info.id)) == 10 * USD
    with Session(engine) as session, session.begin():
        again = ledger.post_transfer(
            session,
            idempotency_key=f"signup:{info.id}",
            kind="signup_grant",
            legs=[ledger.Leg(ledger.PROMOTIONAL_GRANTS, ledger.customer_credits(info.id), USD)],
        )
        assert again is None
        grants = session.scalar(
            select(func.count()).where(LedgerTransfer.idempotency_key.like("signup:%"))
        )
    assert grants == 1
    assert svc.get_account(engine, info.id).balance_nusd == 10 * USD
    with pytest.raises(svc.AccountError, match="already exists"):
        svc.create_account(engine, r, plans, email="alice@example.com")
    assert svc.find_account(engine, "ALICE@example.com") == svc.get_account(engine, info.id)


def test_paid_account_starts_empty(engine: Engine, r: redis.Redis, plans: Plans) -> None:
    info = svc.create_account(engine, r, plans, email="p@example.com", plan="paid")
    assert info.balance_nusd == 0
    assert r.hgetall(rk.account(info.id)) == {b"plan": b"paid", b"status": b"active"}
    with pytest.raises(KeyError):
        svc.create_account(engine, r, plans, email="q@example.com", plan="gold")


def test_grant_is_idempotent_by_key(engine: Engine, r: redis.Redis, plans: Plans) -> None:
    info = svc.create_account(engine, r, plans, email="g@example.com", plan="paid")
    first = svc.grant_credits(
        engine, r, account_id=info.id, amount_nusd=5 * USD, idempotency_key="promo-1"
    )
    second = svc.grant_credits(
        engine, r, account_id=info.id, amount_nusd=5 * USD, idempotency_key="promo-1"
    )
    assert first is not None and second is None
    assert svc.get_account(engine, info.id).balance_nusd == 5 * USD
    assert redis_int(r, rk.balance(info.id)) == 5 * USD
    with pytest.raises(svc.AccountError):
        svc.grant_credits(engine, r, account_id=info.id, amount_nusd=0)
    with pytest.raises(svc.AccountError):
        svc.grant_credits(engine, r, account_id=info.id, amount_nusd=2**53)


async def test_revoked_key_is_refused_at_once(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    c = make_customer(engine, r, plans, usd=1)
    ok = await admission.admit(
        api_key=c.key, request_id="a", model=MODEL, prompt_tokens=1, max_tokens=1, customer_tag=None
    )
    assert ok.__class__.__name__ == "Admitted"
    info = svc.revoke_key(engine, r, key_id=c.key_id)
    assert info.revoked_at is not None
    refused = await admission.admit(
        api_key=c.key, request_id="b", model=MODEL, prompt_tokens=1, max_tokens=1, customer_tag=None
    )
    assert (refused.status, refused.type, refused.code) == (401, "auth", "invalid_api_key")


def test_revoke_by_prefix(engine: Engine, r: redis.Redis, plans: Plans) -> None:
    c = make_customer(engine, r, plans)
    assert r.exists(rk.api_key(hash_key(c.key)))
    svc.revoke_key(engine, r, prefix=c.key[:12])
    assert not r.exists(rk.api_key(hash_key(c.key)))
    with pytest.raises(svc.AccountError):
        svc.revoke_key(engine, r, prefix="dgpu-nothing")
    with pytest.raises(svc.AccountError):
        svc.revoke_key(engine, r)


def test_limits_and_caps_reach_redis(engine: Engine, r: redis.Redis, plans: Plans) -> None:
    c = make_customer(engine, r, plans, tokens_per_day=5000, rpm=7)
    assert r.hmget(rk.account(c.account_id), "rpm", "tpd") == [b"7", b"5000"]
    svc.set_limits(engine, r, account_id=c.account_id, tokens_per_day=None)
    assert r.hmget(rk.account(c.account_id), "rpm", "tpd") == [b"7", None]
    svc.set_customer_cap(
        engine, r, account_id=c.account_id, customer_tag="acme", tokens_per_day=300
    )
    svc.set_customer_cap(engine, r, account_id=c.account_id, customer_tag="*", tokens_per_day=50)
    assert r.hgetall(rk.tag_caps(c.account_id)) == {b"acme": b"300", b"*": b"50"}
    svc.set_customer_cap(
        engine, r, account_id=c.account_id, customer_tag="acme", tokens_per_day=None
    )
    assert r.hgetall(rk.tag_caps(c.account_id)) == {b"*": b"50"}
    svc.set_status(engine, r, account_id=c.account_id, status="suspended")
    assert r.hget(rk.account(c.account_id), "status") == b"suspended"
    with pytest.raises(svc.AccountError):
        svc.set_limits(engine, r, account_id=c.account_id, requests_per_minute=0)


def test_services_work_without_redis(engine: Engine, plans: Plans) -> None:
    info = svc.create_account(engine, None, plans, email="offline@example.com")
    key = svc.create_key(engine, None, account_id=info.id)
    svc.revoke_key(engine, None, key_id=key.id)
    assert svc.get_account(engine, info.id).balance_nusd == 10 * USD


async def test_the_default_trust_tier_reaches_admission_and_survives_a_rebuild(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission
) -> None:
    from billing.rebuild import rebuild

    customer = make_customer(engine, r, plans)
    assert svc.get_account(engine, customer.account_id).default_trust_tier is None
    assert await admission.default_tier(customer.key) is None
    svc.set_default_tier(engine, r, account_id=customer.account_id, tier="verified")
    assert svc.get_account(engine, customer.account_id).default_trust_tier == "verified"
    assert await admission.default_tier(customer.key) == "verified"
    r.flushdb()  # Redis lost: rebuilt from SQL, the tier with it
    rebuild(engine, r)
    assert await admission.default_tier(customer.key) == "verified"
    svc.set_default_tier(engine, r, account_id=customer.account_id, tier=None)
    assert await admission.default_tier(customer.key) is None
    with pytest.raises(ValueError):
        svc.set_default_tier(engine, r, account_id=customer.account_id, tier="gold")
    assert await admission.default_tier("dgpu-not-a-key") is None
