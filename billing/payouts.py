"""Weekly provider payouts through Stripe Connect transfers.

Every Monday 00:00 UTC the week that ended (ISO week, `2026-W03`) is paid: one Stripe
Transfer per provider whose payable for that week (billing.earnings.due_for_week) is at
least $10 and whose owner's Connect account has payouts enabled. The amount is rounded down
to whole cents; the remainder stays payable and carries over to the next week.

For each transfer:
1. one transaction writes the payout row (`pending`) and moves the amount from
   `provider:<id>:payable` to `provider:<id>:payouts_pending` (ledger kind `payout_pending`);
2. Stripe is called with the idempotency key `payout:<provider>:<week>` (a later attempt
   after a refusal adds `:<attempt>`), `transfer_group` `payout_<week>`;
3. success posts the money from payouts-pending to payment clearing (`payout_post`) and
   records the transfer (`stripe_movements`); a refusal (insufficient platform balance,
   account disabled, …) voids it back to payable (`payout_void`) and reports the error; no
   answer (network, 5xx, rate limit) leaves it pending, and the next run of the week asks
   again with the same key, so Stripe answers with the transfer it made, if it made one.

Never paid: a provider's share of usage by its own owner's account (`own_usage_share`: the
owner's credits, promotional ones included, moved to itself; it stays payable, reported as
`withheld_nusd`). Held (status `held`, nothing moved): every provider of an owner whose
account has an open flag (`holds`: a refund or dispute that found the credits spent, or a
dispute not yet closed), until an operator resolves it.

A rerun of a week never pays twice: paid providers are skipped, pending ones are retried
with their own key, and refused ones are tried again only for what is still due.
`run_due` is the schedule: it runs the last completed week once (`payout_runs`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import stripe
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing import ledger
from billing.earnings import due_for_week, payable_provider_ids, payouts_pending
from billing.flags import holds
from billing.stripe_client import error_text, is_definite_failure, plain
from core.schema import (
    Payout,
    PayoutAccount,
    PayoutRun,
    PayoutStatus,
    Provider,
    ProviderReview,
    StripeMovement,
    UsageEvent,
    utcnow,
)
from kernel.errors import InvalidRequest
from kernel.money import CURRENCY, MIN_PAYOUT_CENTS, NUSD_PER_CENT

log = logging.getLogger(__name__)

_WEEK = re.compile(r"^(\d{4})-W(\d{2})$")


class PayoutError(InvalidRequest):
    """A payout run that cannot start: a week that is malformed or not over, no Stripe key."""


class _Raced(Exception):
    """Another run opened this payout first: control flow inside `_Run._open`, which
    catches it, so it never reaches a caller and stays outside `kernel.errors`."""


@dataclass(frozen=True, order=True)
class IsoWeek:
    year: int
    week: int

    @classmethod
    def parse(cls, text: str) -> IsoWeek:
        match = _WEEK.match(text.strip())
        if not match:
            raise PayoutError(f"not an ISO week (YYYY-Www): {text!r}")
        week = cls(int(match[1]), int(match[2]))
        try:
            week.start  # noqa: B018 - validates the week number
        except ValueError:
            raise PayoutError(f"no such week: {text!r}") from None
        return week

    @classmethod
    def of(cls, moment: datetime) -> IsoWeek:
        year, week, _ = moment.astimezone(UTC).isocalendar()
        return cls(year, week)

    @classmethod
    def last_completed(cls, now: datetime) -> IsoWeek:
        """The last week that ended at or before `now`."""
        return cls.of(now.astimezone(UTC) - timedelta(days=7))

    @property
    def start(self) -> datetime:
        return datetime.fromisocalendar(self.year, self.week, 1).replace(tzinfo=UTC)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=7)

    def __str__(self) -> str:
        return f"{self.year}-W{self.week:02d}"


@dataclass
class ProviderPayout:
    provider_id: str
    status: str  # paid already_paid would_pay below_minimum no_provider no_payout_account
    #              payouts_disabled held failed pending_retry in_progress
    amount_cents: int = 0
    due_nusd: int = 0
    transfer_id: str | None = None
    attempt: int | None = None
    error: str | None = None
    # the provider's share of its own owner's usage: stays in payable, never paid out
    withheld_nusd: int = 0

    @property
    def carried_nusd(self) -> int:
        """What stays payable for the next week."""
        paid = self.amount_cents * NUSD_PER_CENT if self.status in ("paid", "would_pay") else 0
        return self.due_nusd + self.withheld_nusd - paid

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "carried_nusd": self.carried_nusd}


@dataclass
class PayoutReport:
    week: str
    dry_run: bool
    items: list[ProviderPayout] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(i.status in ("failed", "pending_retry") for i in self.items)

    def to_json(self) -> dict[str, Any]:
        paid = [i for i in self.items if i.status in ("paid", "would_pay")]
        return {
            "week": self.week,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "paid_cents": sum(i.amount_cents for i in paid),
            "transfers": len(paid),
            "failed": [i.provider_id for i in self.items if i.status == "failed"],
            "providers": [i.to_json() for i in self.items],
        }


@dataclass(frozen=True)
class PayoutRow:
    """A payout as its provider's owner sees it."""

    provider_id: str
    week: str
    amount_cents: int
    status: str
    transfer_id: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def recent_payouts(engine: Engine, provider_ids: list[str], *, limit: int = 20) -> list[PayoutRow]:
    """The providers' latest payouts, newest first."""
    query = (
        select(Payout).where(Payout.provider_id.in_(provider_ids)).order_by(Payout.id.desc())
    ).limit(limit)
    with Session(engine) as session:
        return [
            PayoutRow(p.provider_id, p.week, p.amount_cents, p.status, p.transfer_id)
            for p in session.scalars(query)
        ]


def run_payouts(
    engine: Engine,
    client: stripe.StripeClient | None,
    *,
    week: IsoWeek | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
) -> PayoutReport:
    now = now or datetime.now(UTC)
    week = week or IsoWeek.last_completed(now)
    if week.end > now:
        raise PayoutError(f"week {week} has not ended yet (it ends {week.end.isoformat()})")
    if client is None and not dry_run:
        raise PayoutError("payments are not configured (DARKGPU_STRIPE_SECRET_KEY)")
    with Session(engine) as session:
        candidates = set(payable_provider_ids(session))
        candidates |= set(
            session.scalars(select(Payout.provider_id).where(Payout.week == str(week)))
        )
    report = PayoutReport(str(week), dry_run)
    for provider_id in sorted(candidates):
        item = _Run(engine, client, week, dry_run).provider(provider_id)
        if item is not None:
            report.items.append(item)
    if not dry_run:
        _mark_run(engine, week)
    return report


def run_due(
    engine: Engine, client: stripe.StripeClient | None, *, now: datetime | None = None
) -> PayoutReport | None:
    """The schedule: pay the last completed week unless it was run already (call this every
    few minutes, e.g. from the billing loop; it does nothing most of the time)."""
    now = now or datetime.now(UTC)
    week = IsoWeek.last_completed(now)
    with Session(engine) as session:
        run = session.get(PayoutRun, str(week))
        if run is not None and run.finished_at is not None:
            return None
    return run_payouts(engine, client, week=week, now=now)


def _mark_run(engine: Engine, week: IsoWeek) -> None:
    try:
        with Session(engine) as session, session.begin():
            run = session.get(PayoutRun, str(week))
            if run is None:
                run = PayoutRun(week=str(week))
                session.add(run)
            run.finished_at = utcnow()
    except IntegrityError:  # a concurrent run marked it
        pass


def own_usage_share(session: Session, provider: Provider, before: datetime) -> int:
    """nUSD of the provider's share earned serving its own owner's account (settled before
    `before`): the owner's credits, promotional ones included, moved to itself. It stays in
    the provider's payable and is never paid out."""
    found = session.scalar(
        select(func.coalesce(func.sum(UsageEvent.provider_share_nusd), 0)).where(
            UsageEvent.provider_id == provider.id,
            UsageEvent.account_id == provider.account_id,
            UsageEvent.settled_at_ms < int(before.timestamp() * 1000),
        )
    )
    return int(found or 0)


class _Run:
    def __init__(
        self, engine: Engine, client: stripe.StripeClient | None, week: IsoWeek, dry_run: bool
    ) -> None:
        self.engine = engine
        self.client = client
        self.week = week
        self.dry_run = dry_run

    def provider(self, provider_id: str) -> ProviderPayout | None:
        with Session(self.engine) as session:
            existing = session.scalar(
                select(Payout).where(
                    Payout.provider_id == provider_id, Payout.week == str(self.week)
                )
            )
            if existing is not None and existing.status == PayoutStatus.paid.value:
                return ProviderPayout(
                    provider_id,
                    "already_paid",
                    existing.amount_cents,
                    transfer_id=existing.transfer_id,
                    attempt=existing.attempt,
                )
            prior = existing.attempt if existing is not None else None
            retry_id = None
            if existing is not None and existing.status == PayoutStatus.pending.value:
                item = ProviderPayout(provider_id, "pending_retry", existing.amount_cents)
                item.due_nusd = existing.amount_cents * NUSD_PER_CENT
                retry_id = existing.id
        if retry_id is not None:  # outside the read transaction (SQLite: one writer)
            return item if self.dry_run else self._transfer(retry_id, item)
        with Session(self.engine) as session:
            due = due_for_week(session, provider_id, self.week.end)
            provider = session.get(Provider, provider_id)
            withheld = 0 if provider is None else own_usage_share(session, provider, self.week.end)
            withheld = min(withheld, due)
            due -= withheld
            item = ProviderPayout(provider_id, "below_minimum", due // NUSD_PER_CENT, due)
            item.withheld_nusd = withheld
            if provider is None:
                if due == 0:
                    return None
                item.status = "no_provider"
                item.amount_cents = 0
                return item
            reasons = holds(session, provider.account_id)
            if reasons and item.amount_cents >= MIN_PAYOUT_CENTS:
                item.status, item.amount_cents = "held", 0
                item.error = "held: the owner's account has " + ", ".join(reasons)
                log.warning("payout %s %s %s", provider_id, self.week, item.error)
                return item
            if provider.review != ProviderReview.approved.value and item.amount_cents:
                # suspended or revoked: its earnings wait for the operator's decision
                item.status, item.amount_cents = "held", 0
                item.error = f"held: the provider is {provider.review}"
                log.warning("payout %s %s %s", provider_id, self.week, item.error)
                return item
            if item.amount_cents < MIN_PAYOUT_CENTS:
                item.amount_cents = 0
                return item if due > 0 or withheld > 0 or prior is not None else None
            target = session.get(PayoutAccount, provider.account_id)
            if target is None:
                item.status, item.amount_cents = "no_payout_account", 0
                return item
            if not target.payouts_enabled:
                item.status, item.amount_cents = "payouts_disabled", 0
                return item
            if self.dry_run:
                item.status = "would_pay"
                return item
            stripe_account = target.stripe_account_id
            attempt = prior + 1 if prior is not None else 1
        payout_id = self._open(provider_id, item.amount_cents, stripe_account, attempt)
        if payout_id is None:
            item.status, item.amount_cents = "in_progress", 0
            return item
        item.attempt = attempt
        return self._transfer(payout_id, item)

    def _key(self, provider_id: str, attempt: int) -> str:
        base = f"payout:{provider_id}:{self.week}"
        return base if attempt == 1 else f"{base}:{attempt}"

    def _open(self, provider_id: str, cents: int, stripe_account: str, attempt: int) -> int | None:
        """Write the pending payout and its ledger move; None if another run got there first."""
        key = self._key(provider_id, attempt)
        try:
            with Session(self.engine) as session, session.begin():
                row = session.scalar(
                    select(Payout)
                    .where(Payout.provider_id == provider_id, Payout.week == str(self.week))
                    .with_for_update()
                )
                if row is None:
                    row = Payout(provider_id=provider_id, week=str(self.week))
                    session.add(row)
                elif row.status != PayoutStatus.failed.value or row.attempt + 1 != attempt:
                    return None
                row.attempt = attempt
                row.amount_cents = cents
                row.stripe_account_id = stripe_account
                row.idempotency_key = key
                row.status = PayoutStatus.pending.value
                row.transfer_id = None
                row.error = None
                row.updated_at = utcnow()
                posted = ledger.post_transfer(
                    session,
                    idempotency_key=f"{key}:pending",
                    kind="payout_pending",
                    legs=[
                        ledger.Leg(
                            ledger.provider_payable(provider_id),
                            payouts_pending(provider_id),
                            cents * NUSD_PER_CENT,
                        )
                    ],
                    memo=f"payout {self.week} attempt {attempt}",
                )
                if posted is None:
                    raise _Raced(key)
                session.flush()
                return row.id
        except (IntegrityError, _Raced):
            return None

    def _transfer(self, payout_id: int, item: ProviderPayout) -> ProviderPayout:
        assert self.client is not None
        with Session(self.engine) as session:
            row = session.get(Payout, payout_id)
            assert row is not None
            key, cents, destination = row.idempotency_key, row.amount_cents, row.stripe_account_id
            provider_id, attempt = row.provider_id, row.attempt
        item.attempt = attempt
        params: dict[str, Any] = {
            "amount": cents,
            "currency": CURRENCY,
            "destination": destination,
            "transfer_group": f"payout_{self.week}",
            "description": f"DarkGPU earnings {self.week} ({provider_id})",
            "metadata": {"darkgpu_provider_id": provider_id, "darkgpu_week": str(self.week)},
        }
        try:
            transfer = plain(
                self.client.v1.transfers.create(
                    params=params,  # type: ignore[arg-type]
                    options={"idempotency_key": key},
                )
            )
        except stripe.StripeError as exc:
            text = error_text(exc)[:500]
            if is_definite_failure(exc):
                self._settle(payout_id, ok=False, error=text)
                item.status, item.error = "failed", text
                log.error("payout %s %s refused by Stripe: %s", provider_id, self.week, text)
            else:
                self._note_error(payout_id, text)
                item.status, item.error = "pending_retry", text
                log.error(
                    "payout %s %s unanswered: %s; rerun the week", provider_id, self.week, text
                )
            return item
        self._settle(payout_id, ok=True, transfer=transfer)
        item.status, item.transfer_id = "paid", transfer.get("id")
        return item

    def _note_error(self, payout_id: int, text: str) -> None:
        with Session(self.engine) as session, session.begin():
            row = session.get(Payout, payout_id)
            if row is not None:
                row.error = text
                row.updated_at = utcnow()

    def _settle(
        self,
        payout_id: int,
        *,
        ok: bool,
        transfer: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        now = utcnow()
        with Session(self.engine) as session, session.begin():
            row = session.scalar(select(Payout).where(Payout.id == payout_id).with_for_update())
            if row is None or row.status != PayoutStatus.pending.value:
                return
            nusd = row.amount_cents * NUSD_PER_CENT
            pending = payouts_pending(row.provider_id)
            key = row.idempotency_key
            if ok:
                assert transfer is not None
                ledger.post_transfer(
                    session,
                    idempotency_key=f"{key}:post",
                    kind="payout_post",
                    legs=[ledger.Leg(pending, ledger.PAYMENT_CLEARING, nusd)],
                    memo=f"Stripe transfer {transfer['id']}",
                    event_at=now,
                )
                session.add(
                    StripeMovement(
                        key=f"{key}:post",
                        kind="transfer",
                        stripe_id=str(transfer["id"]),
                        amount_cents=row.amount_cents,
                        clearing_nusd=nusd,
                        provider_id=row.provider_id,
                        occurred_at=now,
                    )
                )
                row.status = PayoutStatus.paid.value
                row.transfer_id = str(transfer["id"])
                row.error = None
            else:
                ledger.post_transfer(
                    session,
                    idempotency_key=f"{key}:void",
                    kind="payout_void",
                    legs=[ledger.Leg(pending, ledger.provider_payable(row.provider_id), nusd)],
                    memo=f"refused: {error}"[:500],
                    event_at=now,
                )
                row.status = PayoutStatus.failed.value
                row.error = error
            row.updated_at = now
