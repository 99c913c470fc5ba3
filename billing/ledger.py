"""The double-entry credit ledger (pgledger style) in integer nano-dollars.

A transfer moves amounts between ledger accounts in one or more legs; each leg writes two
entries (−amount on the debited account, +amount on the credited one), so the entries of
every transfer, and of the whole ledger, sum to zero. Ledger accounts carry a running
balance and version, changed only here, under row locks taken in id order (no deadlocks).
Customer credits may never go negative (checked here and by a CHECK constraint); the
promotional-grants and payment-clearing accounts are the sources money comes from, so they
run negative by design.

Chart of accounts: `customer:<id>:credits`, `provider:<id>:payable`, `platform:revenue`,
`platform:promotional_grants`, `platform:payment_clearing`. A transfer's idempotency key is
unique: posting it again does nothing and returns None.

There is one posting path, `TransferBatch`: its ledger accounts are looked up or created once
and locked once in id order, each transfer is checked against the running balances in
memory, and `flush` writes the transfers and entries in bulk and each account's balance once.
The usage meter posts its batches through it; `post_transfer` (a grant, a purchase, a
payout) is a batch of one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any

from sqlalchemy import Table, func, insert, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from core.schema import LedgerAccount, LedgerEntry, LedgerKind, LedgerTransfer, utcnow
from kernel.errors import BillingError, InternalError


class LedgerError(InternalError):
    """A transfer that breaks the ledger's rules: the caller's bug, never a client's input."""


class InsufficientFunds(BillingError):
    """An account that may not go negative would: the account cannot pay (a 402 where it
    reaches a client), not a broken rule of the ledger."""


@dataclass(frozen=True)
class AccountSpec:
    name: str
    kind: LedgerKind
    allow_negative: bool
    account_id: int | None = None
    provider_id: str | None = None


@dataclass(frozen=True)
class Leg:
    debit: AccountSpec  # money leaves this account
    credit: AccountSpec  # and arrives here
    amount: int

    @property
    def accounts(self) -> tuple[AccountSpec, AccountSpec]:
        return self.debit, self.credit


PLATFORM_REVENUE = AccountSpec("platform:revenue", LedgerKind.platform_revenue, False)
PROMOTIONAL_GRANTS = AccountSpec("platform:promotional_grants", LedgerKind.promotional_grants, True)
PAYMENT_CLEARING = AccountSpec("platform:payment_clearing", LedgerKind.payment_clearing, True)


def customer_credits(account_id: int) -> AccountSpec:
    return AccountSpec(
        f"customer:{account_id}:credits",
        LedgerKind.customer_credits,
        False,
        account_id=account_id,
    )


def provider_payable(provider_id: str) -> AccountSpec:
    provider_id = provider_id or "unassigned"
    return AccountSpec(
        f"provider:{provider_id}:payable",
        LedgerKind.provider_payable,
        False,
        provider_id=provider_id,
    )


def ensure_account(session: Session, spec: AccountSpec) -> int:
    """The id of the ledger account `spec.name`, created if missing (race-safe)."""
    found = session.scalar(select(LedgerAccount.id).where(LedgerAccount.name == spec.name))
    if found is not None:
        return found
    row = LedgerAccount(
        name=spec.name,
        kind=spec.kind.value,
        account_id=spec.account_id,
        provider_id=spec.provider_id,
        balance=0,
        version=0,
        allow_negative=spec.allow_negative,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        found = session.scalar(select(LedgerAccount.id).where(LedgerAccount.name == spec.name))
        if found is None:
            raise
        return found
    return row.id


def transfer_exists(session: Session, idempotency_key: str) -> bool:
    query = select(LedgerTransfer.id).where(LedgerTransfer.idempotency_key == idempotency_key)
    return session.scalar(query) is not None


def post_transfer(
    session: Session,
    *,
    idempotency_key: str,
    kind: str,
    legs: Sequence[Leg],
    memo: str | None = None,
    event_at: datetime | None = None,
) -> int | None:
    """Post a transfer inside the caller's transaction (a `TransferBatch` of one); returns
    its id, or None if a transfer with this idempotency key already exists. Raises
    InsufficientFunds (and changes nothing) if an account that may not go negative would.

    A concurrent transaction posting the same key on other accounts is not held back by
    the account locks; its insert wins and this one finds the key taken (None), as it would
    have found it posted had it come later."""
    legs = _nonzero_legs(legs)
    batch = TransferBatch(
        session, [spec for leg in legs for spec in leg.accounts], [idempotency_key]
    )
    if not batch.post(
        idempotency_key=idempotency_key, kind=kind, legs=legs, memo=memo, event_at=event_at
    ):
        return None
    try:
        with session.begin_nested():
            [transfer_id] = batch.flush()
    except IntegrityError:
        if transfer_exists(session, idempotency_key):
            return None
        raise
    return transfer_id


def _nonzero_legs(legs: Sequence[Leg]) -> list[Leg]:
    for leg in legs:
        if leg.amount < 0:
            raise LedgerError(f"negative leg amount {leg.amount}")
    nonzero = [leg for leg in legs if leg.amount > 0]
    if not nonzero:
        raise LedgerError("a transfer needs at least one non-zero leg")
    return nonzero


class TransferBatch:
    """Transfers posted together inside the caller's transaction: the ledger's one posting
    path (`post_transfer` is a batch of one).

    Made with every ledger account its transfers may touch and (ideally) their idempotency
    keys, it looks the accounts up, creating missing ones, locks them in id order, and learns
    which keys are already posted, in a few statements for the whole batch. `post` then
    checks and applies one transfer in memory, all or nothing, in order; `flush` writes what
    was posted: the transfers and their entries in bulk, and each touched account's balance
    and version once. Each entry carries its account's running balance and version."""

    def __init__(
        self,
        session: Session,
        accounts: Iterable[AccountSpec],
        idempotency_keys: Iterable[str] = (),
    ) -> None:
        self.session = session
        specs = {spec.name: spec for spec in accounts}
        self._ids: dict[str, int] = {}
        if specs:
            found = session.execute(
                select(LedgerAccount.name, LedgerAccount.id).where(
                    LedgerAccount.name.in_(sorted(specs))
                )
            )
            self._ids = {name: acct_id for name, acct_id in found}
            for name in sorted(specs.keys() - self._ids.keys()):
                self._ids[name] = ensure_account(session, specs[name])
        self._locked: dict[int, LedgerAccount] = {}
        if self._ids:
            self._locked = {
                row.id: row
                for row in session.scalars(
                    select(LedgerAccount)
                    .where(LedgerAccount.id.in_(sorted(self._ids.values())))
                    .order_by(LedgerAccount.id)
                    .with_for_update()
                    .execution_options(populate_existing=True)
                )
            }
        self._balances = {acct_id: row.balance for acct_id, row in self._locked.items()}
        self._versions = {acct_id: row.version for acct_id, row in self._locked.items()}
        self._checked = set(idempotency_keys)
        self._posted: set[str] = set()
        if self._checked:
            self._posted = set(
                session.scalars(
                    select(LedgerTransfer.idempotency_key).where(
                        LedgerTransfer.idempotency_key.in_(sorted(self._checked))
                    )
                )
            )
        self._transfers: list[dict[str, Any]] = []
        self._entries: list[list[dict[str, Any]]] = []

    def post(
        self,
        *,
        idempotency_key: str,
        kind: str,
        legs: Sequence[Leg],
        memo: str | None = None,
        event_at: datetime | None = None,
    ) -> bool:
        """Post one transfer (written by the next `flush`); False if a transfer with this
        key is already posted. Raises InsufficientFunds (and changes nothing) if an account
        that may not go negative would, and LedgerError for an account not in the batch."""
        legs = _nonzero_legs(legs)
        if idempotency_key not in self._checked:
            self._checked.add(idempotency_key)
            if transfer_exists(self.session, idempotency_key):
                self._posted.add(idempotency_key)
        if idempotency_key in self._posted:
            return False
        moves: list[tuple[int, int]] = []
        for leg in legs:
            for spec, amount in ((leg.debit, -leg.amount), (leg.credit, leg.amount)):
                acct_id = self._ids.get(spec.name)
                if acct_id is None:
                    raise LedgerError(f"{spec.name} is not an account of this batch")
                moves.append((acct_id, amount))
        after: dict[int, int] = {}
        for acct_id, amount in moves:
            after[acct_id] = after.get(acct_id, self._balances[acct_id]) + amount
        for acct_id, new_balance in after.items():
            row = self._locked[acct_id]
            if new_balance < 0 and not row.allow_negative:
                current = self._balances[acct_id]
                raise InsufficientFunds(
                    f"{row.name}: balance {current} cannot cover {current - new_balance}"
                )
        entries = []
        for acct_id, amount in moves:
            self._balances[acct_id] += amount
            self._versions[acct_id] += 1
            entries.append(
                {
                    "ledger_account_id": acct_id,
                    "amount": amount,
                    "balance_after": self._balances[acct_id],
                    "account_version": self._versions[acct_id],
                }
            )
        self._transfers.append(
            {
                "idempotency_key": idempotency_key,
                "kind": kind,
                "memo": memo,
                "event_at": event_at or utcnow(),
                "created_at": utcnow(),
            }
        )
        self._entries.append(entries)
        self._posted.add(idempotency_key)
        return True

    def flush(self) -> list[int]:
        """Write the transfers posted since the last flush; returns their ids, in order.

        On PostgreSQL the transfers' ids are drawn from their sequence in one statement and
        the transfers and their entries go in by COPY (`bulk_insert`); on SQLite the transfers
        as multi-row INSERT ... RETURNING statements (SQLAlchemy Core's "insertmanyvalues") and
        the entries by one executemany. (The ORM's bulk path sent one INSERT per row on
        PostgreSQL; the multi-row INSERT cost psycopg 40 µs of parsing per transfer.)"""
        if not self._transfers:
            return []
        conn = self.session.connection()
        if conn.dialect.name == "postgresql":
            transfer_ids = _next_ids(self.session, _TRANSFERS, len(self._transfers))
            rows = [{**t, "id": i} for t, i in zip(self._transfers, transfer_ids, strict=True)]
            bulk_insert(self.session, _TRANSFERS, rows)
        else:
            # RETURNING the key too: with sort_by_parameter_order SQLite inserts row by row
            written = conn.execute(
                insert(_TRANSFERS).returning(_TRANSFERS.c.idempotency_key, _TRANSFERS.c.id),
                self._transfers,
            )
            by_key = {key: transfer_id for key, transfer_id in written}
            transfer_ids = [by_key[transfer["idempotency_key"]] for transfer in self._transfers]
        bulk_insert(
            self.session,
            _ENTRIES,
            [
                {**entry, "transfer_id": transfer_id}
                for transfer_id, entries in zip(transfer_ids, self._entries, strict=True)
                for entry in entries
            ],
        )
        for acct_id, row in self._locked.items():
            if row.version != self._versions[acct_id]:
                row.balance = self._balances[acct_id]
                row.version = self._versions[acct_id]
        self.session.flush()
        self._transfers, self._entries = [], []
        return transfer_ids


_TRANSFERS: Table = LedgerTransfer.__table__  # type: ignore[assignment]
_ENTRIES: Table = LedgerEntry.__table__  # type: ignore[assignment]


def _next_ids(session: Session, table: Table, n: int) -> list[int]:
    """`n` new ids from the sequence of `table`'s `id` column (PostgreSQL), ascending."""
    drawn = session.execute(
        text("SELECT nextval(pg_get_serial_sequence(:table, 'id')) FROM generate_series(1, :n)"),
        {"table": table.name, "n": n},
    )
    return sorted(int(i) for (i,) in drawn)


def bulk_insert(session: Session, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert `rows` (column name -> value; every row the same columns) into `table` inside
    the session's transaction, by the database's bulk path, straight through the driver with
    the values passed through the columns' own bind processors: COPY on PostgreSQL (psycopg's
    `Cursor.copy`), one `executemany` on SQLite (SQLAlchemy's executemany spent more time
    building each row's parameters than SQLite spent inserting it). The database's
    constraints and triggers (the append-only tables') hold as for any INSERT; nothing is
    returned."""
    if not rows:
        return
    conn = session.connection()
    names = list(rows[0])
    columns = [table.c[name] for name in names]
    processors = [column.type.bind_processor(conn.dialect) for column in columns]
    ordered = itemgetter(*names)  # every table here has several columns: a tuple
    values = (
        [
            v if process is None else process(v)
            for v, process in zip(ordered(row), processors, strict=True)
        ]
        for row in rows
    )
    quote = conn.dialect.identifier_preparer
    into = "{} ({})".format(
        quote.format_table(table), ", ".join(quote.format_column(c) for c in columns)
    )
    postgres = conn.dialect.name == "postgresql"
    statement = f"COPY {into} FROM STDIN" if postgres else \
        f"INSERT INTO {into} VALUES ({', '.join('?' * len(names))})"  # fmt: skip
    raw = conn.connection.driver_connection
    assert raw is not None
    dbapi_error = conn.dialect.loaded_dbapi.Error
    try:
        if postgres:
            with raw.cursor() as cursor, cursor.copy(statement) as copy:
                for row_values in values:
                    copy.write_row(row_values)
        else:
            raw.executemany(statement, values)
    except dbapi_error as exc:  # as SQLAlchemy raises it for any statement: IntegrityError, …
        raise DBAPIError.instance(statement, None, exc, dbapi_error) from exc


def balance(session: Session, spec_or_name: AccountSpec | str) -> int:
    name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name.name
    found = session.scalar(select(LedgerAccount.balance).where(LedgerAccount.name == name))
    return found or 0


def customer_balances(session: Session) -> dict[int, int]:
    rows = session.execute(
        select(LedgerAccount.account_id, LedgerAccount.balance).where(
            LedgerAccount.kind == LedgerKind.customer_credits.value
        )
    )
    return {account_id: bal for account_id, bal in rows if account_id is not None}


def entries_sum(session: Session) -> int:
    return session.scalar(select(func.coalesce(func.sum(LedgerEntry.amount), 0))) or 0
