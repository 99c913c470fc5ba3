"""`darkgpu admin ledger verify`: the ledgers are what they claim, checked from the last
verified checkpoint (or, `full`, from the first row).

The rules checked:
- the usage hash chain (billing.chain): each usage row's `prev_hash` is the `row_hash` of
  the row before it (the genesis hash for the first), and its `row_hash` is the hash of its
  `prev_hash` and fields;
- each usage row's own money: cost = tokens × prices, split 95/5 (`UsageRecord.money_problem`);
- double entry: the whole ledger's entries sum to zero, each transfer's entries sum to zero,
  no transfer is without entries; each ledger account's stored balance equals the sum of its
  entries, and no account is negative unless it may be;
- every paid request was charged exactly once, for its cost: a usage row's `usage:<request>`
  transfer takes exactly its cost from the customer's credits (the key is unique: once), and
  every usage transfer has its usage row.

Checkpoints (`ledger_checkpoints`, append-only). A successful verification writes one: the
boundary it established (the last usage row id and its `row_hash`, the last transfer id and
the last entry id covered), the counts up to it, and each ledger account's sum of entries up
to the boundary (`ledger_checkpoint_sums`). A failed one writes none. The next verification
starts from the latest checkpoint and reads only what lies after it, by id ranges on primary
keys and indexes, so its cost follows the rows since the checkpoint, not the history:
- the boundary row still has the checkpoint's hash (and its own fields still hash to it),
  and the chain continues from that hash over the usage rows after it;
- the whole ledger sums to zero: the checkpoint's sums plus the entries after it; each
  transfer touched by an entry after the boundary (all its entries) sums to zero; no transfer
  after the boundary is empty; each account's balance is its checkpoint sum plus its entries
  after the boundary (every account is read: that is the accounts' size, not the history's);
- charged once: each usage row after the boundary against its transfer, and each usage
  transfer after the boundary against its row.

An incremental run trusts what lies before its checkpoint: the append-only triggers keep it
as it was checked. A change made behind the triggers' back (a table owner can disable them)
before the checkpoint is found only by `full`, which trusts no checkpoint and starts from
the first row (and writes a checkpoint too when it passes).

Concurrency. The meter writes usage rows and their transfers while a verification runs,
one SQL transaction per batch (billing.meter); grants, purchases and payouts post transfers
in transactions of their own (billing.ledger). The verification reads one snapshot
(REPEATABLE READ on PostgreSQL; on SQLite every transaction takes the writer lock). Ids come
from sequences and can commit out of order: a transaction holding transfer id 100 may commit
after one holding 101 was read. A checkpoint must never cover an id that commits later (no
later run would look at it), so its boundary only takes rows old enough, by `margin_s`
(default five minutes) before `now`:
- the last transfer covered is the last one created (`ledger_transfers.created_at`, set by
  its writer inside its transaction, before its ids are taken) before `now − margin_s`, and
  the last entry covered is the last entry of such a transfer. If every ledger-writing
  transaction commits within D of its transfers' `created_at`, clocks' skew included, and
  the margin is at least 2·D, every id such a transaction took was taken before
  `now − margin_s + D`, and every transaction still open at `now` took its ids after
  `now − D`: later. So nothing at or below the boundary can still commit;
- the last usage row covered is the last one settled (`usage_events.settled_at_ms`) before
  `now − margin_s`. Usage ids commit in order anyway: the meter takes them under the chain's
  lock (an advisory transaction lock on PostgreSQL, the writer lock on SQLite), held until
  it commits, and each row's `prev_hash` names the row before it;
- everything after the boundary that the snapshot holds is verified all the same, and again
  by the next run, until a checkpoint covers it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Table, func, literal, select
from sqlalchemy.orm import Session

from billing import chain, ledger
from core.db import is_postgres
from core.schema import (
    LedgerAccount,
    LedgerCheckpoint,
    LedgerCheckpointSum,
    LedgerEntry,
    LedgerKind,
    LedgerTransfer,
    UsageEvent,
)
from kernel.usage_event import UsageRecord

MARGIN_S = 300.0  # a checkpoint's boundary keeps this far behind now (see the docstring)
USAGE_KEY = "usage:"  # a usage transfer's idempotency key: "usage:<request_id>"


@dataclass(frozen=True)
class Boundary:
    """What a checkpoint established (`checkpoint_id` None: nothing yet, the first row)."""

    checkpoint_id: int | None = None
    last_usage_id: int = 0
    last_row_hash: str = chain.GENESIS
    last_transfer_id: int = 0
    last_entry_id: int = 0
    usage_rows: int = 0
    transfers: int = 0
    entries: int = 0
    created_at: datetime | None = None
    sums: dict[int, int] = field(default_factory=dict)  # ledger account id -> entries' sum

    @classmethod
    def of(cls, row: LedgerCheckpoint, sums: dict[int, int]) -> Boundary:
        """The boundary a `ledger_checkpoints` row records, with its accounts' sums."""
        return cls(
            checkpoint_id=row.id,
            last_usage_id=row.last_usage_id,
            last_row_hash=row.last_row_hash,
            last_transfer_id=row.last_transfer_id,
            last_entry_id=row.last_entry_id,
            usage_rows=row.usage_rows,
            transfers=row.transfers,
            entries=row.entries,
            created_at=row.created_at,
            sums=sums,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.checkpoint_id,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "last_usage_id": self.last_usage_id,
            "last_row_hash": self.last_row_hash,
            "last_transfer_id": self.last_transfer_id,
            "last_entry_id": self.last_entry_id,
            "usage_rows": self.usage_rows,
            "transfers": self.transfers,
            "entries": self.entries,
        }


@dataclass
class VerifyResult:
    """`usage_rows`, `transfers`, `entries`: the rows verified by this run, those after its
    starting checkpoint (`from_checkpoint`, None: from the first row); `checkpoint`: the one
    it wrote (None if it failed or was told not to write)."""

    usage_rows: int = 0
    transfers: int = 0
    entries: int = 0
    problems: list[str] = field(default_factory=list)
    full: bool = True
    from_checkpoint: Boundary | None = None
    checkpoint: Boundary | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def usage_rows_total(self) -> int:
        """The usage rows in the ledger: the starting checkpoint's and those verified now."""
        start = self.from_checkpoint
        return self.usage_rows + (start.usage_rows if start else 0)

    def to_json(self) -> dict[str, Any]:
        start, written = self.from_checkpoint, self.checkpoint
        return {
            "ok": self.ok,
            "full": self.full,
            "from_checkpoint": start.to_json() if start else None,
            "usage_rows": self.usage_rows,
            "transfers": self.transfers,
            "entries": self.entries,
            "usage_rows_total": self.usage_rows_total,
            "checkpoint": written.to_json() if written else None,
            "problems": self.problems,
        }


def latest_checkpoint(session: Session) -> Boundary | None:
    row = session.scalars(
        select(LedgerCheckpoint).order_by(LedgerCheckpoint.id.desc()).limit(1)
    ).first()
    if row is None:
        return None
    sums = session.execute(
        select(LedgerCheckpointSum.ledger_account_id, LedgerCheckpointSum.entries_sum).where(
            LedgerCheckpointSum.checkpoint_id == row.id
        )
    )
    return Boundary.of(row, {acct: int(total) for acct, total in sums})


def verify_ledger(
    engine: Engine,
    *,
    full: bool = False,
    write_checkpoint: bool = True,
    margin_s: float = MARGIN_S,
    now: float | None = None,
    max_problems: int = 100,
) -> VerifyResult:
    """Verify from the latest checkpoint (`full`: from the first row) and, if every rule
    holds, write a new checkpoint (unless `write_checkpoint` is False) whose boundary keeps
    `margin_s` behind `now` (epoch seconds, default the clock's)."""
    now = time.time() if now is None else now
    cutoff_s = now - margin_s
    snapshot = (
        engine.execution_options(isolation_level="REPEATABLE READ")
        if is_postgres(engine)
        else engine
    )
    with Session(snapshot) as session, session.begin():
        start = None if full else latest_checkpoint(session)
        result = VerifyResult(full=start is None, from_checkpoint=start)
        run = _Run(session, start or Boundary(), result, max_problems)
        usage_to = run.usage(int(cutoff_s * 1000))
        run.double_entry()
        run.usage_transfers()
        if result.ok and write_checkpoint:
            result.checkpoint = run.write_checkpoint(
                usage_to, datetime.fromtimestamp(cutoff_s, UTC)
            )
    return result


@dataclass(frozen=True)
class _UsageTo:
    """The usage part of the next boundary: its last row, hash and count of rows."""

    last_id: int
    row_hash: str
    rows: int


class _Run:
    def __init__(
        self, session: Session, start: Boundary, result: VerifyResult, max_problems: int
    ) -> None:
        self.session = session
        self.start = start
        self.result = result
        self.max_problems = max_problems

    def problem(self, text: str) -> None:
        if len(self.result.problems) < self.max_problems:
            self.result.problems.append(text)

    def usage(self, cutoff_ms: int) -> _UsageTo:
        """The chain from the boundary, each row's money and its charge; returns the usage
        part of the next boundary (the last row settled before `cutoff_ms`)."""
        start, session = self.start, self.session
        if start.last_usage_id:
            row = session.get(UsageEvent, start.last_usage_id)
            if row is None:
                self.problem(
                    f"checkpoint {start.checkpoint_id}: its last usage row "
                    f"{start.last_usage_id} is gone"
                )
            else:
                if row.row_hash != start.last_row_hash:
                    self.problem(
                        f"usage row {row.id} ({row.request_id}): row_hash is not checkpoint "
                        f"{start.checkpoint_id}'s (chain broken at the checkpoint)"
                    )
                if chain.row_hash(row.prev_hash, UsageRecord.of(row)) != row.row_hash:
                    self.problem(f"usage row {row.id} ({row.request_id}): row_hash does not match")
        charged = (  # what the row's transfer took from the customer's credits
            select(func.coalesce(func.sum(LedgerEntry.amount), 0))
            .join(LedgerTransfer, LedgerTransfer.id == LedgerEntry.transfer_id)
            .join(LedgerAccount, LedgerAccount.id == LedgerEntry.ledger_account_id)
            .where(
                LedgerTransfer.idempotency_key == literal(USAGE_KEY) + UsageEvent.request_id,
                LedgerTransfer.kind == "usage",
                LedgerAccount.kind == LedgerKind.customer_credits.value,
            )
            .correlate(UsageEvent)
            .scalar_subquery()
        )
        rows = session.execute(
            select(UsageEvent, charged)
            .where(UsageEvent.id > start.last_usage_id)
            .order_by(UsageEvent.id)
            .execution_options(yield_per=1000)
        )
        prev = start.last_row_hash
        to = _UsageTo(start.last_usage_id, start.last_row_hash, start.usage_rows)
        n = 0
        for row, taken in rows:
            n += 1
            name = f"usage row {row.id} ({row.request_id})"
            record = UsageRecord.of(row)
            if row.prev_hash != prev:
                self.problem(f"{name}: chain broken (prev_hash)")
            if chain.row_hash(row.prev_hash, record) != row.row_hash:
                self.problem(f"{name}: row_hash does not match")
            money = record.money_problem()
            if money is not None:
                self.problem(f"{name}: {money}")
            if -int(taken or 0) != row.cost_nusd:
                self.problem(
                    f"{USAGE_KEY}{row.request_id}: ledger charged {-int(taken or 0)}, "
                    f"usage says {row.cost_nusd}"
                )
            if row.settled_at_ms < cutoff_ms:
                to = _UsageTo(row.id, row.row_hash, start.usage_rows + n)
            prev = row.row_hash
        self.result.usage_rows = n
        return to

    def double_entry(self) -> None:
        """The whole ledger, each transfer touched after the boundary and each account."""
        start, session = self.start, self.session
        after = LedgerEntry.id > start.last_entry_id
        self.result.transfers = (
            session.scalar(select(func.count()).where(LedgerTransfer.id > start.last_transfer_id))
            or 0
        )
        self.result.entries = session.scalar(select(func.count()).where(after)) or 0
        new_sums = {
            acct: int(total)
            for acct, total in session.execute(
                select(LedgerEntry.ledger_account_id, func.sum(LedgerEntry.amount))
                .where(after)
                .group_by(LedgerEntry.ledger_account_id)
            )
        }
        total = sum(start.sums.values()) + sum(new_sums.values())
        if total != 0:
            self.problem(f"ledger entries sum to {total}, not 0")
        touched = select(LedgerEntry.transfer_id).where(after).distinct()
        unbalanced = session.execute(
            select(LedgerEntry.transfer_id, func.sum(LedgerEntry.amount))
            .where(LedgerEntry.transfer_id.in_(touched))
            .group_by(LedgerEntry.transfer_id)
            .having(func.sum(LedgerEntry.amount) != 0)
        )
        for transfer_id, amount in unbalanced:
            self.problem(f"transfer {transfer_id}: entries sum to {amount}")
        has_entries = select(LedgerEntry.id).where(LedgerEntry.transfer_id == LedgerTransfer.id)
        empty = session.scalars(
            select(LedgerTransfer.id).where(
                LedgerTransfer.id > start.last_transfer_id, ~has_entries.exists()
            )
        )
        for transfer_id in empty:
            self.problem(f"transfer {transfer_id} has no entries")
        accounts = session.execute(
            select(
                LedgerAccount.id,
                LedgerAccount.name,
                LedgerAccount.balance,
                LedgerAccount.allow_negative,
            )
        )
        for acct_id, name, balance, allow_negative in accounts:
            entries = start.sums.get(acct_id, 0) + new_sums.get(acct_id, 0)
            if balance != entries:
                self.problem(f"ledger account {name}: balance {balance} != entries {entries}")
            if balance < 0 and not allow_negative:
                self.problem(f"ledger account {name} is negative")

    def usage_transfers(self) -> None:
        """Each usage transfer after the boundary has its usage row, and charged its cost
        (rows after the boundary were compared with their transfers by `usage`)."""
        start = self.start
        charged = (
            select(func.coalesce(func.sum(LedgerEntry.amount), 0))
            .join(LedgerAccount, LedgerAccount.id == LedgerEntry.ledger_account_id)
            .where(
                LedgerEntry.transfer_id == LedgerTransfer.id,
                LedgerAccount.kind == LedgerKind.customer_credits.value,
            )
            .correlate(LedgerTransfer)
            .scalar_subquery()
        )
        request_id = func.substr(LedgerTransfer.idempotency_key, len(USAGE_KEY) + 1)
        found = self.session.execute(
            select(LedgerTransfer.idempotency_key, UsageEvent.id, UsageEvent.cost_nusd, charged)
            .outerjoin(UsageEvent, UsageEvent.request_id == request_id)
            .where(LedgerTransfer.id > start.last_transfer_id, LedgerTransfer.kind == "usage")
        )
        for key, usage_id, cost, taken in found:
            if usage_id is None or not key.startswith(USAGE_KEY):
                self.problem(f"{key}: a usage transfer without a usage row")
            elif usage_id <= start.last_usage_id and -int(taken or 0) != cost:
                self.problem(f"{key}: ledger charged {-int(taken or 0)}, usage says {cost}")

    def write_checkpoint(self, usage_to: _UsageTo, cutoff: datetime) -> Boundary:
        """The new boundary: usage up to `usage_to`, transfers created before `cutoff` and
        their entries (see the docstring), with each account's sum of entries up to it."""
        start, session = self.start, self.session
        last_transfer = session.scalar(
            select(func.max(LedgerTransfer.id)).where(
                LedgerTransfer.id > start.last_transfer_id, LedgerTransfer.created_at < cutoff
            )
        )
        last_transfer = max(int(last_transfer or 0), start.last_transfer_id)
        last_entry = session.scalar(
            select(func.max(LedgerEntry.id))
            .join(LedgerTransfer, LedgerTransfer.id == LedgerEntry.transfer_id)
            .where(LedgerEntry.id > start.last_entry_id, LedgerTransfer.created_at < cutoff)
        )
        last_entry = max(int(last_entry or 0), start.last_entry_id)
        covered = (LedgerEntry.id > start.last_entry_id) & (LedgerEntry.id <= last_entry)
        totals = dict(start.sums)
        for acct, total in session.execute(
            select(LedgerEntry.ledger_account_id, func.sum(LedgerEntry.amount))
            .where(covered)
            .group_by(LedgerEntry.ledger_account_id)
        ):
            totals[acct] = totals.get(acct, 0) + int(total)
        sums = {acct: total for acct, total in sorted(totals.items()) if total != 0}
        transfers = session.scalar(
            select(func.count()).where(
                LedgerTransfer.id > start.last_transfer_id, LedgerTransfer.id <= last_transfer
            )
        )
        entries = session.scalar(select(func.count()).where(covered))
        row = LedgerCheckpoint(
            last_usage_id=usage_to.last_id,
            last_row_hash=usage_to.row_hash,
            last_transfer_id=last_transfer,
            last_entry_id=last_entry,
            usage_rows=usage_to.rows,
            transfers=start.transfers + int(transfers or 0),
            entries=start.entries + int(entries or 0),
            verified_from=start.checkpoint_id,
        )
        session.add(row)
        session.flush()
        table: Table = LedgerCheckpointSum.__table__  # type: ignore[assignment]
        ledger.bulk_insert(
            session,
            table,
            [
                {"checkpoint_id": row.id, "ledger_account_id": acct, "entries_sum": total}
                for acct, total in sums.items()
            ],
        )
        return Boundary.of(row, sums)
