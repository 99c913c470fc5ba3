"""Rebuild Redis (the fast copy) from SQL (the truth): keys, accounts and limits, tag caps,
balances and today's token use. Run after Redis was lost or restarted empty; the billing
actor runs it by itself when `dg:ready` is missing. Until then admission answers 503.

Per account, Redis balance = SQL credits − open holds, and today's use = SQL tokens of
today's reservations + open holds of today. The write is one Lua script per account that
only applies if no settlement of that account happened since its SQL snapshot and none of
its settled events is still waiting in the stream (`dg:settles:<id>`, `dg:undrained:<id>`);
otherwise the rebuild drains the stream (when given a meter) and snapshots that account
again. So it is also safe on a live system, where admissions and settlements continue.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import Engine, func, or_, select
from sqlalchemy.orm import Session

from billing import ledger
from billing import redis_state as rs
from billing.admission import utc_day
from billing.lua_scripts import REBUILD_ACCOUNT
from billing.redis_replies import as_str
from core.schema import Account, AccountLimits, ApiKey, CustomerCap, UsageEvent
from kernel import redis_keys as rk
from kernel.errors import Unavailable
from kernel.usage_event import iso_day

if TYPE_CHECKING:
    import redis

    from billing.meter import UsageMeter


class RebuildError(Unavailable):
    """Redis could not be rebuilt while requests kept settling; a later try may succeed."""


@dataclass(frozen=True)
class RebuildReport:
    accounts: int
    keys: int
    stale_keys_removed: int
    rounds: int


def rebuild(
    engine: Engine,
    r: redis.Redis,
    *,
    meter: UsageMeter | None = None,
    now: float | None = None,
    max_rounds: int = 20,
) -> RebuildReport:
    now = time.time() if now is None else now
    day, day_end_ms = utc_day(now)
    sql_day = iso_day(day)
    script = r.register_script(REBUILD_ACCOUNT)

    with Session(engine) as session:
        # an expired key is left out (and removed below as stale); one that will expire
        # gets its Redis record's expiry again
        keys = session.execute(
            select(
                ApiKey.key_hash,
                ApiKey.account_id,
                ApiKey.id,
                ApiKey.expires_at,
                ApiKey.tokens_per_day,
            ).where(
                ApiKey.revoked_at.is_(None),
                or_(
                    ApiKey.expires_at.is_(None),
                    ApiKey.expires_at > datetime.fromtimestamp(now, UTC),
                ),
            )
        ).all()
        accounts = session.execute(
            select(
                Account.id,
                Account.plan,
                Account.status,
                AccountLimits.requests_per_minute,
                AccountLimits.tokens_per_day,
                Account.default_trust_tier,
                AccountLimits.own_tokens_per_day,
            ).outerjoin(AccountLimits, AccountLimits.account_id == Account.id)
        ).all()
        caps: dict[int, dict[str, int]] = {}
        for account_id, tag, n in session.execute(
            select(CustomerCap.account_id, CustomerCap.customer_tag, CustomerCap.tokens_per_day)
        ):
            caps.setdefault(account_id, {})[tag] = n

    for account_id, plan, status, rpm, tpd, tier, own in accounts:
        rs.publish_account(
            r, account_id, plan=plan, status=status, requests_per_minute=rpm, tokens_per_day=tpd,
            trust_tier=tier, own_tokens_per_day=own,
        )  # fmt: skip
        rs.publish_tag_caps(r, account_id, caps.get(account_id, {}))
    active = {rk.api_key(key_hash) for key_hash, *_ in keys}
    pipe = r.pipeline(transaction=False)
    for key_hash, account_id, key_id, expires_at, cap in keys:
        rs.publish_key(pipe, key_hash, account_id=account_id, key_id=key_id, tokens_per_day=cap)
        if expires_at is not None:
            pipe.pexpireat(rk.api_key(key_hash), expires_at)
    pipe.execute()
    stale = [k for k in r.scan_iter(match=rk.api_key("*"), count=1000) if as_str(k) not in active]
    if stale:
        r.delete(*stale)

    pending = [row[0] for row in accounts]
    rounds = 0
    while pending:
        rounds += 1
        if rounds > max_rounds:
            raise RebuildError(f"accounts {pending[:10]} kept settling; rebuild gave up")
        if meter is not None:
            meter.drain_all(claim_idle_ms=0)
        counters = _counters(r, pending)
        snapshot = _snapshot(engine, pending, sql_day)
        retry = []
        for account_id in pending:
            settles, undrained = counters[account_id]
            if undrained > 0:
                retry.append(account_id)
                continue
            balance, used, tags, by_key = snapshot[account_id]
            ok = script(
                keys=[],
                args=[
                    account_id,
                    settles,
                    balance,
                    day,
                    day_end_ms,
                    used,
                    json.dumps(tags, separators=(",", ":")),
                    json.dumps(by_key, separators=(",", ":")),
                ],
            )
            if not int(ok):
                retry.append(account_id)
        pending = retry
        if pending and meter is None:
            time.sleep(0.05 * rounds)
    rs.mark_ready(r)
    return RebuildReport(len(accounts), len(keys), len(stale), rounds)


def _counters(r: redis.Redis, account_ids: list[int]) -> dict[int, tuple[int, int]]:
    pipe = r.pipeline(transaction=False)
    for account_id in account_ids:
        pipe.get(rk.settles(account_id))
        pipe.get(rk.undrained(account_id))
    values = pipe.execute()
    return {
        account_id: (int(values[2 * i] or 0), int(values[2 * i + 1] or 0))
        for i, account_id in enumerate(account_ids)
    }


def _snapshot(
    engine: Engine, account_ids: list[int], sql_day: str
) -> dict[int, tuple[int, int, dict[str, int], dict[str, int]]]:
    """account → (SQL credit balance, tokens today, {tag: tokens today}, {key id: tokens
    today})."""
    result: dict[int, tuple[int, int, dict[str, int], dict[str, int]]] = {}
    with Session(engine) as session:
        balances = ledger.customer_balances(session)
        tokens = UsageEvent.prompt_tokens + UsageEvent.completion_tokens
        used = dict(
            session.execute(
                select(UsageEvent.account_id, func.sum(tokens))
                .where(UsageEvent.usage_day == sql_day)
                .group_by(UsageEvent.account_id)
            ).all()
        )
        tags: dict[int, dict[str, int]] = {}
        for account_id, tag, n in session.execute(
            select(UsageEvent.account_id, UsageEvent.customer_tag, func.sum(tokens))
            .where(UsageEvent.usage_day == sql_day, UsageEvent.customer_tag.is_not(None))
            .group_by(UsageEvent.account_id, UsageEvent.customer_tag)
        ):
            if tag is not None:  # (left out by the query; the type checker cannot know)
                tags.setdefault(account_id, {})[tag] = int(n)
        by_key: dict[int, dict[str, int]] = {}
        for account_id, key_id, n in session.execute(
            select(UsageEvent.account_id, UsageEvent.key_id, func.sum(tokens))
            .where(UsageEvent.usage_day == sql_day)
            .group_by(UsageEvent.account_id, UsageEvent.key_id)
        ):
            if key_id is not None:
                by_key.setdefault(account_id, {})[str(key_id)] = int(n)
    for account_id in account_ids:
        result[account_id] = (
            balances.get(account_id, 0),
            int(used.get(account_id) or 0),
            tags.get(account_id, {}),
            by_key.get(account_id, {}),
        )
    return result
