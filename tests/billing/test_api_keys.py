import hashlib

import redis
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from billing import accounts as svc
from billing.plans import Plans
from core.schema import ApiKey
from kernel import redis_keys as rk
from kernel.tokens import DISPLAY_PREFIX_LEN, generate_key, hash_key, looks_like_key


def test_generated_keys() -> None:
    a, b = generate_key(), generate_key()
    assert a.secret != b.secret
    assert a.secret.startswith("dgpu-") and len(a.secret) >= 5 + 43
    assert looks_like_key(a.secret)
    assert a.key_hash == hashlib.sha256(a.secret.encode()).hexdigest() == hash_key(a.secret)
    assert a.prefix == a.secret[:DISPLAY_PREFIX_LEN]


def test_malformed_keys() -> None:
    for bad in ("", "sk-abc", "dgpu-short", "dgpu-" + "!" * 43):
        assert not looks_like_key(bad)


def test_only_hash_and_prefix_are_stored(engine: Engine, r: redis.Redis, plans: Plans) -> None:
    account = svc.create_account(engine, r, plans, email="k@example.com")
    key = svc.create_key(engine, r, account_id=account.id, name="ci")
    assert key.key is not None
    with Session(engine) as session:
        row = session.scalars(select(ApiKey)).one()
        stored = [str(getattr(row, c.key)) for c in ApiKey.__table__.columns]
    assert key.key not in stored
    assert row.key_hash == hash_key(key.key)
    assert row.prefix == key.key[:DISPLAY_PREFIX_LEN]
    assert r.hget(rk.api_key(row.key_hash), "account") == str(account.id).encode()
    listed = svc.list_keys(engine, account.id)
    assert [k.key for k in listed] == [None]
    assert "key" not in listed[0].to_json()
