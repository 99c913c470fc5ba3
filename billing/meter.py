"""The usage meter: drains the `dg:usage` stream into the SQL ledger.

`UsageMeter.drain_once` takes a batch with a consumer group (first this consumer's own
pending entries, then entries other consumers left pending longer than `claim_idle_ms`
(XAUTOCLAIM), then new ones), writes it in one SQL transaction (usage rows on the hash chain
plus one ledger transfer per paid request: customer credits → 95% provider payable, 5%
platform revenue), commits, and only then acknowledges and deletes the entries. A batch's
transfers go through one `ledger.TransferBatch`: its ledger accounts are looked up and locked
once, each account's balance is written once, and transfers, entries and usage rows are
inserted in bulk. A crash
before the acknowledgement replays the batch; `request_id` is unique, so a replay records
nothing twice. Events that cannot be recorded (malformed, unknown account, credits that
would go negative) go to the `dg:usage:dead` stream for an operator instead of blocking.

Appends to the hash chain are serialised: on PostgreSQL by a transaction advisory lock, on
SQLite by `BEGIN IMMEDIATE` (billing.db).

`BillingLoop` runs the meter forever (plus the reaper and a Redis rebuild when Redis comes
back empty); `BillingActor` (module attribute, Ray imported on first use) is it as a Ray actor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, insert, select, text, update
from sqlalchemy.orm import Session

from billing import chain, ledger
from billing import redis_keys as rk
from billing.db import is_postgres
from billing.lua_scripts import ACK, REAP
from billing.schema import Account, ApiKey, UsageEvent

if TYPE_CHECKING:
    import redis

    from billing.settings import BillingSettings

log = logging.getLogger(__name__)

CHAIN_LOCK_ID = 0x6461726B677075  # "darkgpu": pg_advisory_xact_lock key for chain appends
INT_FIELDS = (
    "account_id",
    "prompt_tokens",
    "completion_tokens",
    "input_nusd_per_token",
    "output_nusd_per_token",
    "cost_nusd",
    "provider_share_nusd",
    "platform_share_nusd",
    "created_at_ms",
    "settled_at_ms",
)


class BadEvent(ValueError):
    pass


@dataclass(frozen=True)
class Entry:
    stream_id: str
    fields: dict[str, str]

    @property
    def account(self) -> str:
        return self.fields.get("account_id", "")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_event(fields: dict[str, str]) -> dict[str, Any]:
    """A stream entry as usage_events column values; checks the money adds up."""
    try:
        event: dict[str, Any] = {name: int(fields[name]) for name in INT_FIELDS}
        event["request_id"] = fields["request_id"]
        event["key_id"] = int(fields["key_id"]) if fields.get("key_id") else None
        event["customer_tag"] = fields.get("customer_tag") or None
        event["model"] = fields["model"]
        event["provider_id"] = fields.get("provider_id", "")
        event["outcome"] = fields["outcome"]
        day = fields["usage_day"]
        event["usage_day"] = f"{day[:4]}-{day[4:6]}-{day[6:8]}" if len(day) == 8 else day
    except (KeyError, ValueError) as exc:
        raise BadEvent(f"malformed usage event: {exc!r}") from None
    expected = (
        event["prompt_tokens"] * event["input_nusd_per_token"]
        + event["completion_tokens"] * event["output_nusd_per_token"]
    )
    if event["cost_nusd"] != expected:
        raise BadEvent(f"cost {event['cost_nusd']} != tokens × prices {expected}")
    if (event["provider_share_nusd"], event["platform_share_nusd"]) != chain.split_cost(expected):
        raise BadEvent("provider/platform split is not 95/5")
    if min(event[name] for name in INT_FIELDS) < 0:
        raise BadEvent("negative value")
    return event


Recorded = Callable[[Sequence[dict[str, Any]]], None]


class UsageMeter:
    """`on_recorded`: called with the usage rows of each batch once they are committed (each
    request once: replays are skipped), e.g. to count spend by model."""

    def __init__(
        self,
        engine: Engine,
        redis: redis.Redis,
        *,
        consumer: str = "meter-1",
        group: str = rk.METER_GROUP,
        claim_idle_ms: int = 60_000,
        on_recorded: Recorded | None = None,
    ) -> None:
        self.engine = engine
        self.on_recorded = on_recorded
        self.redis = redis
        self.consumer = consumer
        self.group = group
        self.claim_idle_ms = claim_idle_ms
        self._ack = redis.register_script(ACK)
        self._group_ready = False

    def ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.redis.xgroup_create(rk.USAGE_STREAM, self.group, id="0", mkstream=True)
        except Exception as exc:  # redis.ResponseError BUSYGROUP: already there
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def read_batch(
        self, max_batch: int, *, block_ms: int | None = None, claim_idle_ms: int | None = None
    ) -> list[Entry]:
        """Own pending entries, else entries idle in other consumers, else new entries."""
        self.ensure_group()
        entries = self._read(max_batch, "0", None)
        if entries:
            return entries
        entries = self._claim(
            max_batch, self.claim_idle_ms if claim_idle_ms is None else claim_idle_ms
        )
        if entries:
            return entries
        return self._read(max_batch, ">", block_ms)

    def _read(self, count: int, from_id: str, block_ms: int | None) -> list[Entry]:
        try:
            reply = self.redis.xreadgroup(
                self.group,
                self.consumer,
                {rk.USAGE_STREAM: from_id},
                count=count,
                block=block_ms,
            )
        except Exception as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group_ready = False  # Redis lost the group (restart): make it again
            self.ensure_group()
            return []
        return [
            Entry(_text(sid), {_text(k): _text(v) for k, v in (data or {}).items()})
            for _stream, items in (reply or [])
            for sid, data in items
        ]

    def _claim(self, count: int, min_idle_ms: int) -> list[Entry]:
        entries: list[Entry] = []
        cursor = "0-0"
        while len(entries) < count:
            reply = self.redis.xautoclaim(
                rk.USAGE_STREAM,
                self.group,
                self.consumer,
                min_idle_ms,
                start_id=cursor,
                count=count - len(entries),
            )
            cursor, items = _text(reply[0]), reply[1]
            entries.extend(
                Entry(_text(sid), {_text(k): _text(v) for k, v in data.items()})
                for sid, data in items
                if data
            )
            if cursor == "0-0":
                break
        return entries

    def drain_once(
        self,
        max_batch: int = 500,
        *,
        block_ms: int | None = None,
        claim_idle_ms: int | None = None,
    ) -> int:
        """Record one batch; returns how many stream entries it handled (0: nothing to do)."""
        entries = self.read_batch(max_batch, block_ms=block_ms, claim_idle_ms=claim_idle_ms)
        if not entries:
            return 0
        dead = self.record(entries)
        for entry, reason in dead:
            log.error("usage event %s dead-lettered: %s", entry.stream_id, reason)
            self.redis.xadd(
                rk.DEAD_STREAM,
                {**entry.fields, "stream_id": entry.stream_id, "error": reason[:500]},
            )
        args: list[str] = [self.group]
        for entry in entries:
            args += [entry.stream_id, entry.account]
        self._ack(keys=[], args=args)
        return len(entries)

    def drain_all(self, max_batch: int = 500, *, claim_idle_ms: int | None = None) -> int:
        """Drain until the stream has nothing left for this consumer; returns entries handled."""
        total = 0
        while n := self.drain_once(max_batch, claim_idle_ms=claim_idle_ms):
            total += n
        return total

    def record(self, entries: Sequence[Entry]) -> list[tuple[Entry, str]]:
        """Write the batch in one transaction; returns the entries that could not be recorded
        (and were not), with the reason. Already-recorded request ids are skipped."""
        dead: list[tuple[Entry, str]] = []
        parsed: list[tuple[Entry, dict[str, Any]]] = []
        for entry in entries:
            try:
                parsed.append((entry, parse_event(entry.fields)))
            except BadEvent as exc:
                dead.append((entry, str(exc)))
        if not parsed:
            return dead
        with Session(self.engine) as session, session.begin():
            if is_postgres(self.engine):
                session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CHAIN_LOCK_ID})
            ids = [event["request_id"] for _e, event in parsed]
            seen = set(
                session.scalars(select(UsageEvent.request_id).where(UsageEvent.request_id.in_(ids)))
            )
            accounts = {event["account_id"] for _e, event in parsed}
            known = set(session.scalars(select(Account.id).where(Account.id.in_(accounts))))
            prev = (
                session.scalar(select(UsageEvent.row_hash).order_by(UsageEvent.id.desc()).limit(1))
                or chain.GENESIS
            )
            fresh: list[tuple[Entry, dict[str, Any]]] = []
            for entry, event in parsed:
                if event["request_id"] in seen:
                    continue
                if event["account_id"] not in known:
                    dead.append((entry, f"unknown account {event['account_id']}"))
                    continue
                seen.add(event["request_id"])
                fresh.append((entry, event))
            paid = [event for _e, event in fresh if event["cost_nusd"] > 0]
            batch = ledger.TransferBatch(
                session,
                [spec for event in paid for leg in _usage_legs(event) for spec in leg.accounts],
                [_usage_key(event) for event in paid],
            )
            rows: list[dict[str, Any]] = []
            last_used: dict[int, int] = {}
            for entry, event in fresh:
                if event["cost_nusd"] > 0:
                    try:
                        _post_usage(batch, event)
                    except ledger.InsufficientFunds as exc:
                        dead.append((entry, str(exc)))
                        continue
                digest = chain.row_hash(prev, event)
                rows.append({**event, "prev_hash": prev, "row_hash": digest})
                prev = digest
                if event["key_id"] is not None:
                    key_id = event["key_id"]
                    last_used[key_id] = max(last_used.get(key_id, 0), event["created_at_ms"])
            batch.flush()
            if rows:
                session.execute(insert(UsageEvent), rows)
            for key_id, ms in last_used.items():
                moment = datetime.fromtimestamp(ms / 1000, UTC)
                session.execute(
                    update(ApiKey)
                    .where(ApiKey.id == key_id)
                    .where((ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < moment))
                    .values(last_used_at=moment)
                )
        if rows and self.on_recorded is not None:
            try:  # committed: a failing observer must not replay the batch
                self.on_recorded(rows)
            except Exception:
                log.exception("on_recorded failed")
        return dead

    def reap(self, now: float | None = None, *, limit: int = 1000) -> int:
        """Settle expired holds as zero usage (the same script as Admission.reap)."""
        now_ms = int((time.time() if now is None else now) * 1000)
        script = self.redis.register_script(REAP)
        total = 0
        while True:
            n = int(script(keys=[], args=[now_ms, limit, rk.DONE_TTL_MS]))
            total += n
            if n < limit:
                return total


def _usage_key(event: dict[str, Any]) -> str:
    return f"usage:{event['request_id']}"


def _usage_legs(event: dict[str, Any]) -> list[ledger.Leg]:
    """Customer credits → provider payable (95%) and platform revenue (5%); zero legs left out."""
    credits = ledger.customer_credits(event["account_id"])
    legs = [
        ledger.Leg(
            credits, ledger.provider_payable(event["provider_id"]), event["provider_share_nusd"]
        ),
        ledger.Leg(credits, ledger.PLATFORM_REVENUE, event["platform_share_nusd"]),
    ]
    return [leg for leg in legs if leg.amount > 0]


def _post_usage(batch: ledger.TransferBatch, event: dict[str, Any]) -> None:
    """Post one paid request's transfer into the batch (raises ledger.InsufficientFunds)."""
    batch.post(
        idempotency_key=_usage_key(event),
        kind="usage",
        legs=_usage_legs(event),
        memo=f"{event['model']} {event['prompt_tokens']}+{event['completion_tokens']} tokens",
        event_at=datetime.fromtimestamp(event["settled_at_ms"] / 1000, UTC),
    )


class BillingLoop:
    """The billing actor's body: drain the usage stream, reap expired holds, rebuild Redis
    from SQL when it comes back empty, mark providers whose agent stopped heartbeating
    `offline`, and run the week's payouts when due. Plain Python; `BillingActor` runs it
    under Ray."""

    def __init__(
        self,
        database_url: str | None = None,
        redis_url: str | None = None,
        *,
        consumer: str = "meter-1",
        max_batch: int = 500,
        block_ms: int = 1000,
        reap_every_s: float = 5.0,
        payouts_every_s: float = 300.0,
        settings: BillingSettings | None = None,
        on_recorded: Recorded | None = None,
    ) -> None:
        import redis as redis_lib

        from billing.db import make_engine, migrate
        from billing.settings import BillingSettings

        settings = settings or BillingSettings()
        self.settings = settings
        self.engine = make_engine(database_url or settings.database_url)
        migrate(self.engine)
        self.redis = redis_lib.Redis.from_url(redis_url or settings.redis_url)
        self.meter = UsageMeter(self.engine, self.redis, consumer=consumer, on_recorded=on_recorded)
        self.max_batch = max_batch
        self.block_ms = block_ms
        self.reap_every_s = reap_every_s
        self.payouts_every_s = payouts_every_s
        self._stop = threading.Event()

    def step(self) -> int:
        from billing.rebuild import rebuild
        from billing.redis_state import is_ready

        if not is_ready(self.redis):
            rebuild(self.engine, self.redis, meter=self.meter)
        return self.meter.drain_once(self.max_batch, block_ms=self.block_ms)

    def run(self, max_iterations: int | None = None) -> int:
        handled, iterations, last_reap, last_payouts = 0, 0, 0.0, 0.0
        while not self._stop.is_set():
            if max_iterations is not None and iterations >= max_iterations:
                break
            iterations += 1
            try:
                handled += self.step()
                if time.monotonic() - last_reap >= self.reap_every_s:
                    self.meter.reap()
                    self.mark_stale_providers()
                    last_reap = time.monotonic()
                if time.monotonic() - last_payouts >= self.payouts_every_s:
                    last_payouts = time.monotonic()
                    self.pay_due_week()
            except Exception:  # keep metering through Redis or database outages
                log.exception("billing loop step failed; retrying")
                self._stop.wait(1.0)
        return handled

    def mark_stale_providers(self) -> int:
        """Providers silent for `DARKGPU_OFFLINE_AFTER_S` become `offline` (cluster.registry)."""
        from cluster.registry import RegistrySettings, mark_stale_offline

        older_than_s = RegistrySettings().offline_after_s
        return mark_stale_offline(self.engine, older_than_s=older_than_s)

    def pay_due_week(self) -> None:
        """Monday's payouts for the week that ended, once (billing.payouts.run_due)."""
        from billing.payouts import run_due
        from billing.stripe_client import maybe_stripe_client

        client = maybe_stripe_client(self.settings)
        if client is not None:
            run_due(self.engine, client)

    def stop(self) -> None:
        self._stop.set()


def __getattr__(name: str) -> Any:
    if name == "BillingActor":
        import ray

        return ray.remote(num_cpus=0, max_concurrency=2)(BillingLoop)
    raise AttributeError(name)
