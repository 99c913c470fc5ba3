"""SQL first, then Redis: how a committed change reaches the fast copy.

Every writer of billing state (account services, signup, Stripe webhooks, the billing actor)
commits to SQL, the truth, and only then touches Redis. What it does there depends on whether
Redis holds billing state at all (`dg:ready`):

- it does: the writer applies its own incremental update (a balance delta, a key, an
  account's limits);
- it does not (a fresh or wiped Redis): the whole state is rebuilt from SQL instead, which
  already holds the change, and the incremental update is skipped; a partial Redis must never
  answer for accounts it does not know, and an increment on a missing balance would invent
  one.

If the Redis write fails after the commit, the error goes to the caller (SQL stands; the
billing actor or `darkgpu admin redis rebuild` repairs Redis).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from billing import redis_state as rs
from billing.rebuild import rebuild

if TYPE_CHECKING:
    import redis

    from billing.meter import UsageMeter


def ready_or_rebuilt(
    engine: Engine, r: redis.Redis | None, *, meter: UsageMeter | None = None
) -> bool:
    """True when Redis holds billing state, so incremental updates apply. A Redis without
    it is rebuilt from SQL first (draining the usage stream through `meter`, when given) and
    the answer is False: the rebuild already wrote everything SQL holds. No Redis: False."""
    if r is None:
        return False
    if rs.is_ready(r):
        return True
    rebuild(engine, r, meter=meter)
    return False


def after_commit(
    engine: Engine, r: redis.Redis | None, update: Callable[[redis.Redis], object]
) -> None:
    """Bring Redis up to a change just committed to SQL: `update(r)` when Redis holds
    billing state, else a rebuild from SQL (which has the change)."""
    if r is not None and ready_or_rebuilt(engine, r):
        update(r)
