"""Admission and settlement: one Redis round trip each (Lua, billing.lua_scripts).

`admit` decides, atomically and before inference: the key is known and not revoked (401),
requests per minute (GCRA, burst = the limit; 429 `rate_limit_exceeded`), the daily token
cap of the account and of the customer tag (429 `daily_cap_exceeded`, Retry-After until
00:00 UTC), and credits (402 `insufficient_credits`). It reserves prompt + max_tokens tokens
against the caps and their cost (prompt at the input price, max_tokens at the output price)
against the balance, lowering max_tokens to what remains when that is less. Nothing is
cached in the process: a revoked key fails on the next request on every ingress.

`settle` bills the tokens the engine reported, never more than reserved, refunds the rest,
and appends the usage event to the `dg:usage` stream; it is idempotent (False when the hold
is already settled or unknown), so it is safe to retry and safe against the reaper. `reap`
settles reservations left open past their expiry as zero usage: only what was settled is
ever billed. A request that streams longer than the hold TTL should call `extend`.

Clock: `now` (epoch seconds) defaults to this host's clock; ingress hosts are assumed
NTP-synced (skew shifts the per-minute window by the skew, nothing else). The UTC day of the
reservation is the day the request's tokens count against, even if it settles after midnight.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import redis.exceptions

from billing import redis_keys as rk
from billing.keys import hash_key, looks_like_key
from billing.lua_scripts import ADMIT, EXTEND, REAP, SETTLE
from billing.money import nusd_to_usd
from billing.plans import Plans
from billing.ratelimit_headers import format_duration, rate_limit_headers, retry_after_seconds

if TYPE_CHECKING:
    import redis.asyncio

    from cluster.catalog import CatalogModel

MAX_REQUEST_ID_LEN = 128
MAX_CUSTOMER_TAG_LEN = 256
_SETTLE_RETRY_DELAYS_S = (0.05, 0.25, 1.0)


@dataclass
class Admitted:
    account_id: int
    key_id: int
    max_tokens: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Refused:
    status: int
    type: str
    code: str
    message: str
    retry_after_s: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


INVALID_KEY = Refused(
    401,
    "auth",
    "invalid_api_key",
    "Incorrect API key provided. Create a key in the console and send it as "
    "'Authorization: Bearer dgpu-...'.",
)


def utc_day(now: float) -> tuple[str, int]:
    """(YYYYMMDD, epoch ms of the next 00:00 UTC) for epoch seconds `now`."""
    moment = datetime.fromtimestamp(now, UTC)
    start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    end = start + timedelta(days=1)
    return moment.strftime("%Y%m%d"), int(end.timestamp()) * 1000


def plans_json(plans: Plans) -> str:
    """{plan: [requests/min, tokens/day or -1]} for the admission script."""
    table = {
        name: [plan.requests_per_minute, -1 if plan.tokens_per_day is None else plan.tokens_per_day]
        for name, plan in plans.plans.items()
    }
    return json.dumps(table, separators=(",", ":"), sort_keys=True)


def connect(url: str, *, max_connections: int = 512, wait_s: float = 5.0) -> redis.asyncio.Redis:
    """The asyncio Redis client to give `Admission`.

    - Its pool waits up to `wait_s` for a free connection once `max_connections` are busy.
      redis-py's default pool (`Redis.from_url`) holds at most 100 connections and raises
      MaxConnectionsError (a ConnectionError) for the 101st concurrent command: admission
      would answer 503 and settlement would give up, under nothing worse than a burst.
    - A Redis that is down fails fast (two quick retries, connect timeout 2 s) so the client
      gets its 503 at once; redis-py's default retries back off for about 4 s.
    """
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    pool = aredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=wait_s,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
    )
    return aredis.Redis.from_pool(pool)


class Admission:
    def __init__(
        self, redis: redis.asyncio.Redis, plans: Plans, *, hold_ttl_s: float = 1800.0
    ) -> None:
        self._redis = redis
        self._plans_json = plans_json(plans)
        self._hold_ttl_ms = int(hold_ttl_s * 1000)
        self._admit = redis.register_script(ADMIT)
        self._settle = redis.register_script(SETTLE)
        self._reap = redis.register_script(REAP)
        self._extend = redis.register_script(EXTEND)

    async def admit(
        self,
        *,
        api_key: str,
        request_id: str,
        model: CatalogModel,
        prompt_tokens: int,
        max_tokens: int,
        customer_tag: str | None,
        now: float | None = None,
        price: tuple[int, int] | None = None,
    ) -> Admitted | Refused:
        """`price`: (input, output) nano-dollars per token to reserve at, where the request
        may be served above the catalog price (the highest its candidates bill); default the
        model's catalog prices."""
        if prompt_tokens < 0 or max_tokens < 1:
            raise ValueError("prompt_tokens must be >= 0 and max_tokens >= 1")
        if not request_id or len(request_id) > MAX_REQUEST_ID_LEN:
            raise ValueError(f"request_id must be 1..{MAX_REQUEST_ID_LEN} characters")
        if not api_key or not looks_like_key(api_key):
            return _copy(INVALID_KEY)
        tag = customer_tag or ""
        if len(tag) > MAX_CUSTOMER_TAG_LEN:
            return Refused(
                400,
                "invalid_request",
                "invalid_customer_id",
                f"X-Customer-Id is longer than {MAX_CUSTOMER_TAG_LEN} characters.",
            )
        now = time.time() if now is None else now
        now_ms = int(now * 1000)
        day, day_end_ms = utc_day(now)
        keys = [
            rk.api_key(hash_key(api_key)),
            rk.hold(request_id),
            rk.done(request_id),
            rk.HOLDS,
            rk.READY,
        ]
        args = [
            now_ms,
            day,
            day_end_ms,
            tag,
            prompt_tokens,
            max_tokens,
            *(price or (model.input_nusd_per_token, model.output_nusd_per_token)),
            self._hold_ttl_ms,
            model.id,
            self._plans_json,
            request_id,
        ]
        try:
            reply = await self._admit(keys=keys, args=args)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return _unavailable()
        return _decide(reply, prompt_tokens=prompt_tokens, customer_tag=tag)

    async def authenticate(self, api_key: str | None) -> int | Refused:
        """The account of a valid key, for requests that run no inference (two reads).

        The same rules as `admit`: unknown, malformed or revoked keys and disabled accounts
        are refused; nothing is counted against the account's limits.
        """
        if not api_key or not looks_like_key(api_key):
            return _copy(INVALID_KEY)
        try:
            account = await self._redis.hget(rk.api_key(hash_key(api_key)), "account")
            status = None
            if account is not None:
                status = await self._redis.hget(rk.account(int(account)), "status")
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return _unavailable()
        if account is None:
            return _copy(INVALID_KEY)
        if _text(status) != "active":
            return Refused(401, "auth", "account_disabled", "This account is disabled.")
        return int(account)

    async def default_tier(self, api_key: str | None) -> str | None:
        """The trust tier the key's account has its requests inherit (None: any, or an
        unknown key: `admit` refuses that one)."""
        if not api_key or not looks_like_key(api_key):
            return None
        account = await self._redis.hget(rk.api_key(hash_key(api_key)), "account")
        if account is None:
            return None
        return _text(await self._redis.hget(rk.account(int(account)), "tier")) or None

    async def settle(
        self,
        *,
        request_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        provider_id: str,
        now: float | None = None,
        price: tuple[int, int] | None = None,
    ) -> bool:
        """Bill the reported usage (clamped to the reservation) and refund the rest. Retries
        on connection errors: a retry after a lost reply finds the hold gone and changes
        nothing. `price`: (input, output) nano-dollars per token of the provider that served,
        each capped at the reserved price; default the reserved prices."""
        now_ms = int((time.time() if now is None else now) * 1000)
        args = [
            request_id,
            max(0, prompt_tokens),
            max(0, completion_tokens),
            provider_id,
            now_ms,
            rk.DONE_TTL_MS,
        ]
        if price is not None:
            args += [max(0, int(price[0])), max(0, int(price[1]))]
        for delay in (*_SETTLE_RETRY_DELAYS_S, None):
            try:
                return bool(await self._settle(keys=[], args=args))
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                if delay is None:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def reap(self, now: float | None = None, *, limit: int = 1000) -> int:
        """Settle (as zero usage) every hold past its expiry; returns how many."""
        now_ms = int((time.time() if now is None else now) * 1000)
        total = 0
        while True:
            n = int(await self._reap(keys=[], args=[now_ms, limit, rk.DONE_TTL_MS]))
            total += n
            if n < limit:
                return total

    async def extend(self, *, request_id: str, now: float | None = None) -> bool:
        """Push an open hold's expiry to now + the hold TTL; False if it is not open."""
        now_ms = int((time.time() if now is None else now) * 1000)
        expiry = now_ms + self._hold_ttl_ms
        return bool(await self._extend(keys=[], args=[request_id, expiry]))


def _copy(refused: Refused) -> Refused:
    return Refused(
        refused.status,
        refused.type,
        refused.code,
        refused.message,
        refused.retry_after_s,
        dict(refused.headers),
    )


def _unavailable() -> Refused:
    return Refused(
        503,
        "service_unavailable",
        "billing_unavailable",
        "Billing is temporarily unavailable; please retry shortly.",
        1,
        {"retry-after": "1"},
    )


def _decide(reply: list, *, prompt_tokens: int, customer_tag: str) -> Admitted | Refused:
    outcome = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    if outcome == "cold":
        return _unavailable()
    if outcome == "nokey":
        return _copy(INVALID_KEY)
    if outcome == "disabled":
        return Refused(401, "auth", "account_disabled", "This account is disabled.")
    account_id, key_id = int(reply[1]), int(reply[2])
    if outcome == "dup":
        return Refused(
            400, "invalid_request", "duplicate_request_id", "This request id was already used."
        )
    (granted, rpm_limit, rpm_rem, rpm_reset, tok_limit, tok_rem, tok_reset, retry_ms, bal, room) = (
        int(x) for x in reply[3:13]
    )
    headers = rate_limit_headers(
        rpm_limit=rpm_limit,
        rpm_remaining=rpm_rem,
        rpm_reset_ms=rpm_reset,
        tok_limit=tok_limit,
        tok_remaining=tok_rem,
        tok_reset_ms=tok_reset,
    )
    if outcome == "ok":
        return Admitted(account_id=account_id, key_id=key_id, max_tokens=granted, headers=headers)
    if outcome == "rpm":
        retry = retry_after_seconds(retry_ms)
        headers["retry-after"] = str(retry)
        return Refused(
            429,
            "rate_limit",
            "rate_limit_exceeded",
            f"Rate limit reached for requests per minute: limit {rpm_limit}. "
            f"Please try again in {format_duration(retry_ms)}.",
            retry,
            headers,
        )
    if outcome in ("cap", "tagcap"):
        retry = retry_after_seconds(retry_ms)
        headers["retry-after"] = str(retry)
        headers["x-should-retry"] = "false"
        whose = f"customer '{customer_tag}'" if outcome == "tagcap" else "account"
        return Refused(
            429,
            "rate_limit",
            "daily_cap_exceeded",
            f"Daily token cap reached for this {whose}: {room} tokens remain today, this "
            f"request needs at least {prompt_tokens + 1} (prompt plus one output token). "
            f"Caps reset at 00:00 UTC (in {format_duration(retry_ms)}).",
            retry,
            headers,
        )
    if outcome == "credits":
        headers["x-should-retry"] = "false"
        return Refused(
            402,
            "billing",
            "insufficient_credits",
            f"Insufficient credits: the available balance is ${nusd_to_usd(max(bal, 0))}, "
            "less than this request's prompt plus one output token. Add credits to continue.",
            None,
            headers,
        )
    raise RuntimeError(f"unexpected admission outcome {outcome!r}")


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
