"""Admission and settlement: one Redis round trip each (Lua, billing.lua_scripts).

`admit` decides, atomically and before inference: the key is known and not revoked (401),
requests per minute (GCRA, burst = the limit; 429 `rate_limit_exceeded`), the daily token
caps of the account, of the API key and of the customer tag (429 `daily_cap_exceeded`,
Retry-After until 00:00 UTC), and credits (402 `insufficient_credits`). It reserves the
request's worst case: prompt + max_tokens x completions tokens (completions: the sequences
the engine generates, prompts x n) against the caps and their cost (prompt at the input
price, the rest at the output price) against the balance, lowering max_tokens (per
completion) to what remains when that is less. Nothing is cached in the process: a revoked
key fails on the next request on every ingress.

`settle` bills the tokens the engine reported, refunds the rest of the reservation, and
appends the usage event to the `dg:usage` stream. A report above the reservation is a bug in
the reservation, never clipped silently: it is billed as far as the balance allows (never
below zero), counted in the `dg:overruns` hash, and returned (`Settlement`) for the caller
to log and count. `settle` is idempotent (False when the hold is already settled or
unknown), so it is safe to retry and safe against the reaper.

A hold lives as long as its request: the ingress pushes the expiry of every request it has
in flight (`extend`, `extend_many`), and a stream writes the usage it has delivered so far
into its hold now and then (`checkpoint`: prompt and completion tokens, the serving provider
and its prices; the hold's fields are listed in billing.lua_scripts). `reap` settles the
holds nobody extended past their expiry (their ingress died, or Redis was away when they
settled) at their last checkpoint, through the same script as `settle`: the ledger, the daily
caps, the provider's earnings and the usage stream see it once. A hold with no checkpoint is
reaped as zero usage: nothing was delivered that billing knows of. Reaping and settling end
a hold atomically in Redis: whichever comes first bills, and the other bills nothing (a late
settle after a reap is not billed its tokens above the checkpoint).

Clock: `now` (epoch seconds) defaults to this host's clock; ingress hosts are assumed
NTP-synced (skew shifts the per-minute window by the skew, nothing else). The UTC day of the
reservation is the day the request's tokens count against, even if it settles after midnight.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

import redis.exceptions

from billing.lua_scripts import ADMIT, CHECKPOINT, EXTEND, REAP, SETTLE
from billing.plans import Plans
from billing.ratelimit_headers import format_duration, rate_limit_headers, retry_after_seconds
from billing.redis_packing import hiredis_packing
from billing.redis_replies import as_str
from kernel import redis_keys as rk
from kernel.money import nusd_to_usd
from kernel.tokens import hash_key, looks_like_key

if TYPE_CHECKING:
    import redis.asyncio


class PricedModel(Protocol):
    """What admission needs of a model (a `cluster.catalog.CatalogModel` is one): its id and
    its catalog prices in nano-dollars per token."""

    @property
    def id(self) -> str: ...

    @property
    def input_nusd_per_token(self) -> int: ...

    @property
    def output_nusd_per_token(self) -> int: ...


MAX_REQUEST_ID_LEN = 128
MAX_CUSTOMER_TAG_LEN = 256
_SETTLE_RETRY_DELAYS_S = (0.05, 0.25, 1.0)
# The admission script's daily-cap outcomes -> whose cap was reached, in the refusal's words
CAPS = {"cap": "account", "tagcap": "customer '{customer_tag}'", "keycap": "API key"}


@dataclass
class Admitted:
    account_id: int
    key_id: int
    max_tokens: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Settlement:
    """A settlement's outcome: `overrun_tokens` reported above the reservation, of which
    `unbilled_tokens` the balance could not pay (both 0 when the reservation held)."""

    settled: bool
    overrun_tokens: int = 0
    unbilled_tokens: int = 0


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
    """(YYYYMMDD, epoch ms of the next 00:00 UTC) for epoch seconds `now`: the last day's
    answer while `now` is in it (every admission asks; datetime's arithmetic was a twentieth
    of an admission's client CPU)."""
    global _last_day
    start_ms, end_ms, day = _last_day
    if start_ms <= now * 1000 < end_ms:
        return day, end_ms
    moment = datetime.fromtimestamp(now, UTC)
    start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    end = start + timedelta(days=1)
    day, end_ms = moment.strftime("%Y%m%d"), int(end.timestamp()) * 1000
    _last_day = (int(start.timestamp()) * 1000, end_ms, day)
    return day, end_ms


_last_day: tuple[int, int, str] = (0, 0, "")


def plans_json(plans: Plans) -> str:
    """{plan: [requests/min, tokens/day or -1]} for the admission script."""
    table = {
        name: [plan.requests_per_minute, -1 if plan.tokens_per_day is None else plan.tokens_per_day]
        for name, plan in plans.plans.items()
    }
    return json.dumps(table, separators=(",", ":"), sort_keys=True)


def connect(
    url: str,
    *,
    max_connections: int = 512,
    wait_s: float = 5.0,
    parser_class: type | None = None,
) -> redis.asyncio.Redis:
    """The asyncio Redis client to give `Admission`.

    - Its pool waits up to `wait_s` for a free connection once `max_connections` are busy.
      redis-py's default pool (`Redis.from_url`) holds at most 100 connections and raises
      MaxConnectionsError (a ConnectionError) for the 101st concurrent command: admission
      would answer 503 and settlement would give up, under nothing worse than a burst.
    - A Redis that is down fails fast (two quick retries, connect timeout 2 s) so the client
      gets its 503 at once; redis-py's default retries back off for about 4 s.
    - Replies are parsed by redis-py's default parser: hiredis's C parser, installed with the
      platform (`parser_class` is for bench/billing.py, which compares it with the Python one);
      commands are packed by hiredis too (`billing.redis_packing`).
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
        **({"parser_class": parser_class} if parser_class is not None else {}),
    )
    pool.connection_class = hiredis_packing(pool.connection_class)
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
        self._checkpoint = redis.register_script(CHECKPOINT)

    @property
    def hold_ttl_s(self) -> float:
        """How long a hold stays open without being extended."""
        return self._hold_ttl_ms / 1000

    async def admit(
        self,
        *,
        api_key: str,
        request_id: str,
        model: PricedModel,
        prompt_tokens: int,
        max_tokens: int,
        customer_tag: str | None,
        now: float | None = None,
        price: tuple[int, int] | None = None,
        completions: int = 1,
    ) -> Admitted | Refused:
        """`price`: (input, output) nano-dollars per token to reserve at, where the request
        may be served above the catalog price (the highest its candidates bill); default the
        model's catalog prices. `completions`: how many sequences the engine generates, each
        up to `max_tokens` (prompts x n); the granted max_tokens is per completion."""
        if prompt_tokens < 0 or max_tokens < 1 or completions < 1:
            raise ValueError("prompt_tokens must be >= 0, max_tokens and completions >= 1")
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
        args: list[int | str] = [
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
            completions,
        ]
        try:
            reply = await self._admit(keys=keys, args=args)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return _unavailable()
        fields = (reply if isinstance(reply, bytes) else str(reply).encode()).split(b"|")
        return _decide(
            fields, prompt_tokens=prompt_tokens, customer_tag=tag, completions=completions
        )

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
        if as_str(status) != "active":
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
        return as_str(await self._redis.hget(rk.account(int(account)), "tier")) or None

    async def settle(
        self,
        *,
        request_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        provider_id: str,
        now: float | None = None,
        price: tuple[int, int] | None = None,
        reported_completion_tokens: int | None = None,
    ) -> bool:
        """`settle_usage`, answering only whether the hold was open."""
        settlement = await self.settle_usage(
            request_id=request_id,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            provider_id=provider_id,
            now=now,
            price=price,
            reported_completion_tokens=reported_completion_tokens,
        )
        return settlement.settled

    async def settle_usage(
        self,
        *,
        request_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        provider_id: str,
        now: float | None = None,
        price: tuple[int, int] | None = None,
        reported_completion_tokens: int | None = None,
    ) -> Settlement:
        """Bill the reported usage and refund the rest of the reservation (usage above it:
        billed as far as the balance allows, and reported in the answer). Retries on
        connection errors: a retry after a lost reply finds the hold gone and changes
        nothing. `price`: (input, output) nano-dollars per token of the provider that served,
        each capped at the reserved price; default the reserved prices.
        `reported_completion_tokens`: what the engine reported, kept in the usage event beside
        `completion_tokens` (the ingress's own count, billed; never above it)."""
        now_ms = int((time.time() if now is None else now) * 1000)
        args: list[int | str] = [
            request_id,
            max(0, prompt_tokens),
            max(0, completion_tokens),
            provider_id,
            now_ms,
            rk.DONE_TTL_MS,
        ]
        if price is not None:
            args += [max(0, int(price[0])), max(0, int(price[1]))]
        if reported_completion_tokens is not None:
            args += ["", ""] if price is None else []
            args.append(max(0, reported_completion_tokens))
        for delay in (*_SETTLE_RETRY_DELAYS_S, None):
            try:
                reply = await self._settle(keys=[], args=args)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                continue
            if isinstance(reply, list):  # {1, over, unbilled}: above the reservation
                return Settlement(True, int(reply[1]), int(reply[2]))
            return Settlement(bool(reply))
        raise AssertionError("unreachable")

    async def reap(self, now: float | None = None, *, limit: int = 1000) -> int:
        """Settle every hold past its expiry at its last checkpoint (zero usage without one:
        nothing was delivered that billing knows of); returns how many."""
        now_ms = int((time.time() if now is None else now) * 1000)
        total = 0
        while True:
            n = int(await self._reap(keys=[], args=[now_ms, limit, rk.DONE_TTL_MS]))
            total += n
            if n < limit:
                return total

    async def extend(self, *, request_id: str, now: float | None = None) -> bool:
        """Push an open hold's expiry to now + the hold TTL; False if it is not open."""
        return await self.extend_many([request_id], now=now) == 1

    async def extend_many(self, request_ids: Sequence[str], *, now: float | None = None) -> int:
        """Push each open hold's expiry to now + the hold TTL (never earlier than it was), in
        one round trip; returns how many were open."""
        if not request_ids:
            return 0
        expiry = int((time.time() if now is None else now) * 1000) + self._hold_ttl_ms
        return int(await self._extend(keys=[], args=[expiry, *request_ids]))

    async def checkpoint(
        self,
        *,
        request_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        provider_id: str,
        price: tuple[int, int] | None = None,
        now: float | None = None,
        reported_completion_tokens: int | None = None,
    ) -> bool:
        """Keep a stream's usage delivered so far in its hold, and push its expiry: what the
        reaper bills if the request is never settled. `price`: the serving provider's
        (input, output) per token, capped at the reserved prices when billed (None: the
        reserved ones). A checkpoint below the hold's last one is ignored. False: the hold
        is not open (settled or reaped already), and nothing was written."""
        now_ms = int((time.time() if now is None else now) * 1000)
        pin, pout = ("", "") if price is None else (max(0, int(price[0])), max(0, int(price[1])))
        args: list[int | str] = [
            request_id,
            max(0, prompt_tokens),
            max(0, completion_tokens),
            provider_id,
            pin,
            pout,
            now_ms,
            now_ms + self._hold_ttl_ms,
        ]
        if reported_completion_tokens is not None:  # what the engine said, beside our count
            args.append(max(0, reported_completion_tokens))
        return bool(await self._checkpoint(keys=[], args=args))


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


def _decide(
    reply: Sequence[bytes], *, prompt_tokens: int, customer_tag: str, completions: int = 1
) -> Admitted | Refused:
    """The admission script's reply, split at '|': its outcome, then the numbers it reports."""
    outcome = reply[0].decode()
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
    if outcome in CAPS:
        retry = retry_after_seconds(retry_ms)
        headers["retry-after"] = str(retry)
        headers["x-should-retry"] = "false"
        whose = CAPS[outcome].format(customer_tag=customer_tag)
        return Refused(
            429,
            "rate_limit",
            "daily_cap_exceeded",
            f"Daily token cap reached for this {whose}: {room} tokens remain today, this "
            f"request needs at least {prompt_tokens + completions} (prompt plus one output "
            f"token per completion). Caps reset at 00:00 UTC (in {format_duration(retry_ms)}).",
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
            "less than this request's prompt plus one output token per completion. Add "
            "credits to continue.",
            None,
            headers,
        )
    raise RuntimeError(f"unexpected admission outcome {outcome!r}")
