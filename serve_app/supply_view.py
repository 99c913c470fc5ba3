"""The supply plan as an ingress sees it, and the demand it reports back.

The reconciler (`serve_app.supply`) publishes which models are deployed into the state Redis;
an ingress reads it at most once a second, in the background (a request uses the last
reading; only the first waits). On the same turn it writes when it last had a request for
each model (`dg:supply:asked`: what warms a cold model), how many it had (added to the
running totals of `dg:supply:requests`: what shares out GPUs that fit several models; a
request it refused, which costs its caller nothing, counts once per account and model a
minute, so that nobody can move GPUs with free refusals), and any load time it measured: from
the first request it answered 503 `model_warming` to the moment Serve pushed the model's first
running replica (`serve_app.availability`), kept in `dg:supply:load_s` so that every
ingress's `Retry-After` matches the last measured load.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from typing import Any

from kernel import redis_keys
from serve_app.supply import Plan, floats

logger = logging.getLogger("darkgpu.supply")
# A refused request counts as demand once per account and model in this many seconds.
REFUSED_COUNT_EVERY_S = 60.0


class SupplyView:
    def __init__(self, redis: Any, default_load_s: int, ttl_s: float = 1.0) -> None:
        self._redis = redis
        self._default_load_s = default_load_s
        self._ttl_s = ttl_s
        self._plan: Plan | None = None
        self._load_s: dict[str, float] = {}  # model -> seconds its last load took
        self._read_at = 0.0
        self._reading: asyncio.Task[None] | None = None
        self._asked: dict[str, float] = {}  # model -> when asked, not written yet
        self._requests: Counter[str] = Counter()  # model -> requests, not written yet
        self._refused: dict[tuple[int, str], float] = {}  # (account, model) -> counted when
        self._warming: dict[str, float] = {}  # model -> when this ingress first said warming
        self._measured: dict[str, float] = {}  # model -> a load time not written yet

    async def plan(self) -> Plan | None:
        """The last reading of the plan (None: no reconciler has published one)."""
        if time.monotonic() - self._read_at > self._ttl_s:
            if self._reading is None or self._reading.done():
                self._reading = asyncio.create_task(self._refresh())
            if self._read_at == 0.0:
                await asyncio.shield(self._reading)
        return self._plan

    def asked(self, model_id: str, refused_account: int | None = None) -> None:
        """A request for the model: admitted, or refused to `refused_account` (503
        `model_warming`), which counts towards the model's demand at most once a minute."""
        now = time.time()
        self._asked[model_id] = now
        if refused_account is not None:
            counted = self._refused.get((refused_account, model_id))
            if counted is not None and now - counted < REFUSED_COUNT_EVERY_S:
                return
            self._refused[(refused_account, model_id)] = now
        self._requests[model_id] += 1

    def retry_after_s(self, model_id: str) -> int:
        """How long until a warming model's replica is likely up: the measured load time
        less what has passed since this ingress first said it was warming."""
        now = time.monotonic()
        since = self._warming.setdefault(model_id, now)
        load_s = self._load_s.get(model_id, self._default_load_s)
        return max(1, math.ceil(load_s - (now - since)))

    def online(self, model_id: str) -> None:
        """Serve pushed a running replica of the model (`ReplicaAvailability`'s callback)."""
        since = self._warming.pop(model_id, None)
        if since is not None:
            self._measured[model_id] = self._load_s[model_id] = time.monotonic() - since

    async def _refresh(self) -> None:
        asked, self._asked = self._asked, {}
        fresh = time.time() - REFUSED_COUNT_EVERY_S
        self._refused = {who: at for who, at in self._refused.items() if at > fresh}
        requests, self._requests = self._requests, Counter()
        measured, self._measured = self._measured, {}
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                # every key of the state Redis expires (kernel.redis_keys)
                if asked:
                    pipe.hset(redis_keys.SUPPLY_ASKED, mapping=asked)
                    pipe.expire(redis_keys.SUPPLY_ASKED, redis_keys.SUPPLY_TTL_S)
                if requests:
                    for model_id, count in requests.items():
                        pipe.hincrby(redis_keys.SUPPLY_REQUESTS, model_id, count)
                    pipe.expire(redis_keys.SUPPLY_REQUESTS, redis_keys.SUPPLY_TTL_S)
                if measured:
                    pipe.hset(redis_keys.SUPPLY_LOAD_S, mapping=measured)
                    pipe.expire(redis_keys.SUPPLY_LOAD_S, redis_keys.SUPPLY_TTL_S)
                pipe.get(redis_keys.SUPPLY_PLAN)
                pipe.hgetall(redis_keys.SUPPLY_LOAD_S)
                *_, raw, loads = await pipe.execute()
            self._plan = Plan.from_json(raw) if raw else None
            self._load_s = {**floats(loads), **measured}
            # a model that left the plan before a replica ran ended its warming unmeasured
            planned = self._plan.models if self._plan is not None else {}
            self._warming = {m: at for m, at in self._warming.items() if m in planned}
        except Exception as exc:  # noqa: BLE001 - keep the last reading; report again next turn
            logger.warning("reading the supply plan failed: %r", exc)
            self._asked = {**asked, **self._asked}
            self._requests += requests
            self._measured = {**measured, **self._measured}
            if self._read_at == 0.0:
                return
        self._read_at = time.monotonic()
