"""Writes of SQL state into Redis (the fast copy), shared by account services and rebuild."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from kernel import redis_keys as rk

if TYPE_CHECKING:
    import redis


def is_ready(r: redis.Redis) -> bool:
    return bool(r.exists(rk.READY))


def mark_ready(r: redis.Redis) -> None:
    r.set(rk.READY, "1")


def publish_account(
    r: redis.Redis,
    account_id: int,
    *,
    plan: str,
    status: str,
    requests_per_minute: int | None,
    tokens_per_day: int | None,
    trust_tier: str | None = None,
    own_tokens_per_day: int | None = None,
) -> None:
    key = rk.account(account_id)
    pipe = r.pipeline(transaction=True)
    pipe.hset(key, mapping={"plan": plan, "status": status})
    optional = (("rpm", requests_per_minute), ("tpd", tokens_per_day), ("tier", trust_tier),
                ("own", own_tokens_per_day))  # fmt: skip
    for name, value in optional:
        if value is None:
            pipe.hdel(key, name)
        else:
            pipe.hset(key, name, str(value))
    pipe.execute()


def publish_tag_caps(r: redis.Redis, account_id: int, caps: Mapping[str, int]) -> None:
    key = rk.tag_caps(account_id)
    pipe = r.pipeline(transaction=True)
    pipe.delete(key)
    if caps:
        pipe.hset(key, mapping={tag: str(n) for tag, n in caps.items()})
    pipe.execute()


def publish_key(
    r: redis.Redis,
    key_hash: str,
    *,
    account_id: int,
    key_id: int,
    tokens_per_day: int | None = None,
) -> None:
    """`r` may be a pipeline: rebuild writes every key in one round trip."""
    key = rk.api_key(key_hash)
    r.hset(key, mapping={"account": str(account_id), "key_id": str(key_id)})
    if tokens_per_day is None:
        r.hdel(key, "tpd")
    else:
        r.hset(key, "tpd", str(tokens_per_day))


# A key's daily cap, in its record only while the record exists: a key revoked meanwhile
# (its record deleted) must not come back as a record. ARGV: cap ('' removes it).
_SET_KEY_CAP = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == '' then redis.call('HDEL', KEYS[1], 'tpd')
else redis.call('HSET', KEYS[1], 'tpd', ARGV[1]) end
return 1
"""


def set_key_cap(r: redis.Redis, key_hash: str, tokens_per_day: int | None) -> None:
    cap = "" if tokens_per_day is None else str(tokens_per_day)
    r.eval(_SET_KEY_CAP, 1, rk.api_key(key_hash), cap)


def unpublish_key(r: redis.Redis, key_hash: str) -> None:
    r.delete(rk.api_key(key_hash))


def add_balance(r: redis.Redis, account_id: int, delta_nusd: int) -> None:
    r.incrby(rk.balance(account_id), delta_nusd)
