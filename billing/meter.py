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
nothing twice. A usage row whose engine reported more completion tokens than the ingress
billed, beyond a tolerance, also gets a strike against its provider, in the same transaction
(billing.strikes). Events that cannot be recorded (malformed, unknown account, credits that
would go negative) go to the `dg:usage:dead` stream for an operator instead of blocking.

Appends to the hash chain are serialised: on PostgreSQL by a transaction advisory lock, on
SQLite by `BEGIN IMMEDIATE` (core.db).

`billing.loop.BillingLoop` runs the meter forever (plus the reaper and a Redis rebuild when
Redis comes back empty), in a thread of the `billing-meter` deployment (serve_app.app).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select, text, update
from sqlalchemy.orm import Session

from billing import chain, ledger, strikes
from billing.lua_scripts import ACK, REAP
from billing.redis_replies import StreamEntry, as_str, read_group_entries, stream_entries
from core.db import is_postgres
from core.schema import Account, ApiKey, UsageEvent
from kernel import redis_keys as rk
from kernel.errors import InternalError
from kernel.usage_event import UsageRecord

if TYPE_CHECKING:
    import redis
    from redis.typing import EncodableT, FieldT


log = logging.getLogger(__name__)

CHAIN_LOCK_ID = 0x6461726B677075  # "darkgpu": pg_advisory_xact_lock key for chain appends


class BadEvent(InternalError):
    """A usage event the ingress wrote malformed: dead-lettered, never billed."""


def parse_event(fields: dict[str, str]) -> UsageRecord:
    """A stream entry as a usage record; BadEvent if it is malformed or its money does not
    add up (kernel.usage_event)."""
    try:
        return UsageRecord.from_stream(fields)
    except ValueError as exc:
        raise BadEvent(str(exc)) from None


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
    ) -> list[StreamEntry]:
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

    def _read(self, count: int, from_id: str, block_ms: int | None) -> list[StreamEntry]:
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
        return read_group_entries(reply)

    def _claim(self, count: int, min_idle_ms: int) -> list[StreamEntry]:
        entries: list[StreamEntry] = []
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
            cursor = as_str(reply[0])
            entries.extend(entry for entry in stream_entries(reply[1]) if entry.fields)
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
            letter: dict[FieldT, EncodableT] = {k: v for k, v in entry.fields.items()}
            letter.update(stream_id=entry.stream_id, error=reason[:500])
            self.redis.xadd(rk.DEAD_STREAM, letter)
        args: list[str] = [self.group]
        for entry in entries:
            args += [entry.stream_id, entry.fields.get("account_id", "")]
        self._ack(keys=[], args=args)
        return len(entries)

    def drain_all(self, max_batch: int = 500, *, claim_idle_ms: int | None = None) -> int:
        """Drain until the stream has nothing left for this consumer; returns entries handled."""
        total = 0
        while n := self.drain_once(max_batch, claim_idle_ms=claim_idle_ms):
            total += n
        return total

    def record(self, entries: Sequence[StreamEntry]) -> list[tuple[StreamEntry, str]]:
        """Write the batch in one transaction; returns the entries that could not be recorded
        (and were not), with the reason. Already-recorded request ids are skipped."""
        dead: list[tuple[StreamEntry, str]] = []
        parsed: list[tuple[StreamEntry, UsageRecord]] = []
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
            ids = [event.request_id for _e, event in parsed]
            seen = set(
                session.scalars(select(UsageEvent.request_id).where(UsageEvent.request_id.in_(ids)))
            )
            accounts = {event.account_id for _e, event in parsed}
            known = set(session.scalars(select(Account.id).where(Account.id.in_(accounts))))
            prev = (
                session.scalar(select(UsageEvent.row_hash).order_by(UsageEvent.id.desc()).limit(1))
                or chain.GENESIS
            )
            fresh: list[tuple[StreamEntry, UsageRecord]] = []
            for entry, event in parsed:
                if event.request_id in seen:
                    continue
                if event.account_id not in known:
                    dead.append((entry, f"unknown account {event.account_id}"))
                    continue
                seen.add(event.request_id)
                fresh.append((entry, event))
            paid = [event for _e, event in fresh if event.cost_nusd > 0]
            batch = ledger.TransferBatch(
                session,
                [spec for event in paid for leg in _usage_legs(event) for spec in leg.accounts],
                [_usage_key(event) for event in paid],
            )
            rows: list[dict[str, Any]] = []
            recorded: list[UsageRecord] = []
            last_used: dict[int, int] = {}
            for entry, event in fresh:
                if event.cost_nusd > 0:
                    try:
                        _post_usage(batch, event)
                    except ledger.InsufficientFunds as exc:
                        dead.append((entry, str(exc)))
                        continue
                digest = chain.row_hash(prev, event)
                rows.append({**event.row(), "prev_hash": prev, "row_hash": digest})
                recorded.append(event)
                prev = digest
                if event.key_id is not None:
                    key_id = event.key_id
                    last_used[key_id] = max(last_used.get(key_id, 0), event.created_at_ms)
            batch.flush()
            if rows:  # COPY on PostgreSQL (the ORM's insert sent one INSERT per row)
                ledger.bulk_insert(session, UsageEvent.__table__, rows)  # type: ignore[arg-type]
            struck = strikes.record(session, recorded)
            for key_id, ms in last_used.items():
                moment = datetime.fromtimestamp(ms / 1000, UTC)
                session.execute(
                    update(ApiKey)
                    .where(ApiKey.id == key_id)
                    .where((ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < moment))
                    .values(last_used_at=moment)
                )
        if rows:
            for strike in struck:
                log.warning(
                    "usage strike: provider %s's engine reported %d completion tokens for "
                    "request %s, the ingress delivered %d",
                    strike.provider_id, strike.reported_tokens, strike.request_id,
                    strike.counted_tokens,
                )  # fmt: skip
            strikes.count_metric(struck)
        if rows and self.on_recorded is not None:
            try:  # committed: a failing observer must not replay the batch
                self.on_recorded(rows)
            except Exception:
                log.exception("on_recorded failed")
        return dead

    def reap(self, now: float | None = None, *, limit: int = 1000) -> int:
        """Settle expired holds at their last checkpoint, zero usage without one (the same
        script as Admission.reap)."""
        now_ms = int((time.time() if now is None else now) * 1000)
        script = self.redis.register_script(REAP)
        total = 0
        while True:
            n = int(script(keys=[], args=[now_ms, limit, rk.DONE_TTL_MS]))
            total += n
            if n < limit:
                return total


def _usage_key(event: UsageRecord) -> str:
    return f"usage:{event.request_id}"


def _usage_legs(event: UsageRecord) -> list[ledger.Leg]:
    """Customer credits → provider payable and platform revenue (the event's split, checked
    by `parse_event`); zero legs left out."""
    credits = ledger.customer_credits(event.account_id)
    legs = [
        ledger.Leg(credits, ledger.provider_payable(event.provider_id), event.provider_share_nusd),
        ledger.Leg(credits, ledger.PLATFORM_REVENUE, event.platform_share_nusd),
    ]
    return [leg for leg in legs if leg.amount > 0]


def _post_usage(batch: ledger.TransferBatch, event: UsageRecord) -> None:
    """Post one paid request's transfer into the batch (raises ledger.InsufficientFunds)."""
    batch.post(
        idempotency_key=_usage_key(event),
        kind="usage",
        legs=_usage_legs(event),
        memo=f"{event.model} {event.prompt_tokens}+{event.completion_tokens} tokens",
        event_at=datetime.fromtimestamp(event.settled_at_ms / 1000, UTC),
    )
