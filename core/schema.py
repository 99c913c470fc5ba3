"""The SQL schema (SQLAlchemy 2): accounts, API keys, limits, the double-entry credit ledger
and the hash-chained usage ledger. SQL is the truth; Redis holds a fast copy.

Money columns are BIGINT nano-dollars. Usage timestamps are integer epoch milliseconds (UTC),
so the hash chain covers exact values on every database. `usage_events`, `ledger_transfers`,
`ledger_entries` and the verification's checkpoints are append-only: the migrations install
triggers refusing UPDATE and DELETE (and TRUNCATE on PostgreSQL). `ledger_accounts` carries
running balances (pgledger style), so it is updated in place, under row locks, and every
change is an entry.

A table's owner can disable triggers; in production run the application as a role that does
not own these tables and `REVOKE UPDATE, DELETE, TRUNCATE` on them from it. The hash chain
(billing.chain, checked by `darkgpu admin ledger verify`) detects what gets past that.

Every moment column is a `UtcDateTime` (the type of each `Mapped[datetime]`): aware UTC in,
aware UTC out, on every database. SQLite keeps no zone and hands timestamps back naive, so
without it each reader would have to repair them, and a naive value written by mistake would
be stored as if it were UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from kernel.gpu import CcState

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets BIGINT identities.
Id = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A moment in UTC: `TIMESTAMP WITH TIME ZONE` (the database type does not change), that
    refuses a naive datetime on write (its zone would be a guess) and returns aware UTC on
    read, SQLite's naive values included. Query parameters compared with such a column pass
    through it too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()}: give its zone (UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UtcDateTime()}


class AccountStatus(StrEnum):
    active = "active"
    suspended = "suspended"


class LedgerKind(StrEnum):
    customer_credits = "customer_credits"
    provider_payable = "provider_payable"
    platform_revenue = "platform_revenue"
    promotional_grants = "promotional_grants"
    payment_clearing = "payment_clearing"


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    plan: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=AccountStatus.active.value)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the trust tier a request inherits when it names none (`basic` | `verified`); None: any
    default_trust_tier: Mapped[str | None] = mapped_column(String(16))
    # the customer's low-balance alert: an email when credits fall below this (None: off)
    low_balance_nusd: Mapped[int | None] = mapped_column(BigInteger)
    low_balance_notified_at: Mapped[datetime | None]
    # a deleted account keeps its ledger rows (the law keeps them); its email is scrubbed
    deleted_at: Mapped[datetime | None]
    # the operator's own account: the console's operator pages (providers' review); granted
    # only by `darkgpu admin account update --operator`
    operator: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)  # the customer's cap, if any

    __table_args__ = (CheckConstraint("tokens_per_day IS NULL OR tokens_per_day >= 0", name="tpd"),)


class AccountLimits(Base):
    """Per-account overrides of the plan's limits; NULL keeps the plan's value.

    `tokens_per_day` is the operator's (or a capped budget's) daily cap; `own_tokens_per_day`
    is the customer's own, which can only lower it: the tighter of the two applies
    (`billing.plans.daily_cap`)."""

    __tablename__ = "account_limits"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)
    own_tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        CheckConstraint("requests_per_minute IS NULL OR requests_per_minute > 0", name="rpm"),
        CheckConstraint("tokens_per_day IS NULL OR tokens_per_day >= 0", name="tpd"),
        CheckConstraint("own_tokens_per_day IS NULL OR own_tokens_per_day >= 0", name="own_tpd"),
    )


class CustomerCap(Base):
    """A daily token cap for one customer tag (`X-Customer-Id`) of an account; the tag `*`
    applies to every tag of that account without its own cap."""

    __tablename__ = "customer_caps"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    customer_tag: Mapped[str] = mapped_column(String(256))
    tokens_per_day: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("account_id", "customer_tag", name="uq_customer_caps_account_tag"),
        CheckConstraint("tokens_per_day >= 0", name="tpd"),
    )


class LedgerAccount(Base):
    __tablename__ = "ledger_accounts"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id"), index=True)
    provider_id: Mapped[str | None] = mapped_column(String(128))
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    version: Mapped[int] = mapped_column(Integer, default=0)
    allow_negative: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        CheckConstraint("allow_negative OR balance >= 0", name="not_negative"),
        CheckConstraint(
            "kind IN (" + ", ".join(f"'{k.value}'" for k in LedgerKind) + ")", name="kind"
        ),
    )


class LedgerTransfer(Base):
    __tablename__ = "ledger_transfers"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    memo: Mapped[str | None] = mapped_column(String(500))
    event_at: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    # what moved since a moment (a payout's later earnings, billing.earnings.due_for_week): a
    # range of recent transfers, not every entry of the account since it opened (issue 13)
    __table_args__ = (Index("ix_ledger_transfers_event_at", "event_at"),)


class LedgerEntry(Base):
    """One leg of a transfer: `amount` is signed (the legs of a transfer sum to zero);
    `balance_after` and `account_version` are the ledger account's state after it."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    transfer_id: Mapped[int] = mapped_column(ForeignKey("ledger_transfers.id"), index=True)
    ledger_account_id: Mapped[int] = mapped_column(ForeignKey("ledger_accounts.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    balance_after: Mapped[int] = mapped_column(BigInteger)
    account_version: Mapped[int] = mapped_column(Integer)

    __table_args__ = (CheckConstraint("amount <> 0", name="nonzero"),)


class UsageEvent(Base):
    """One settled request. `row_hash = sha256(prev_hash + canonical fields)` (billing.chain)."""

    __tablename__ = "usage_events"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    key_id: Mapped[int | None] = mapped_column(BigInteger)
    customer_tag: Mapped[str | None] = mapped_column(String(256))
    model: Mapped[str] = mapped_column(String(128))
    provider_id: Mapped[str] = mapped_column(String(128))
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    # what the engine (on the provider's machine) reported; `completion_tokens` is the
    # ingress's own count of what it delivered, never more than this. NULL before 0007.
    reported_completion_tokens: Mapped[int | None] = mapped_column(BigInteger)
    input_nusd_per_token: Mapped[int] = mapped_column(BigInteger)
    output_nusd_per_token: Mapped[int] = mapped_column(BigInteger)
    cost_nusd: Mapped[int] = mapped_column(BigInteger)
    provider_share_nusd: Mapped[int] = mapped_column(BigInteger)
    platform_share_nusd: Mapped[int] = mapped_column(BigInteger)
    outcome: Mapped[str] = mapped_column(String(16))  # settled | reaped
    usage_day: Mapped[str] = mapped_column(String(10))  # UTC day of the reservation
    created_at_ms: Mapped[int] = mapped_column(BigInteger)  # admission (reservation)
    settled_at_ms: Mapped[int] = mapped_column(BigInteger)
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64), unique=True)

    __table_args__ = (
        Index("ix_usage_events_account_created", "account_id", "created_at_ms"),
        Index("ix_usage_events_day", "usage_day", "account_id"),
        # demand and last week's earnings (a range of settlement), each provider's record
        # (cluster.market)
        Index("ix_usage_events_settled", "settled_at_ms"),
        Index("ix_usage_events_provider_settled", "provider_id", "settled_at_ms"),
        # a provider's earnings over days (billing.earnings): its rows of those days only,
        # not every row of its history (issue 13)
        Index("ix_usage_events_provider_day", "provider_id", "usage_day"),
        CheckConstraint(
            "prompt_tokens >= 0 AND completion_tokens >= 0 AND cost_nusd >= 0", name="nonneg"
        ),
        CheckConstraint("provider_share_nusd + platform_share_nusd = cost_nusd", name="split"),
    )


class LedgerCheckpoint(Base):
    """What a successful `darkgpu admin ledger verify` established up to a boundary
    (billing.verify): every usage row up to `last_usage_id` chains to `last_row_hash`, and
    every transfer up to `last_transfer_id` and entry up to `last_entry_id` was checked; the
    counts are of the rows up to the boundary. Its `LedgerCheckpointSum`s hold each ledger
    account's sum of entries up to `last_entry_id`. `verified_from` is the checkpoint the
    verification started from (None: from the first row). Append-only."""

    __tablename__ = "ledger_checkpoints"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    last_usage_id: Mapped[int] = mapped_column(BigInteger)
    last_row_hash: Mapped[str] = mapped_column(String(64))
    last_transfer_id: Mapped[int] = mapped_column(BigInteger)
    last_entry_id: Mapped[int] = mapped_column(BigInteger)
    usage_rows: Mapped[int] = mapped_column(BigInteger)
    transfers: Mapped[int] = mapped_column(BigInteger)
    entries: Mapped[int] = mapped_column(BigInteger)
    verified_from: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LedgerCheckpointSum(Base):
    """A ledger account's sum of entries up to its checkpoint's `last_entry_id` (nUSD)."""

    __tablename__ = "ledger_checkpoint_sums"

    checkpoint_id: Mapped[int] = mapped_column(
        ForeignKey("ledger_checkpoints.id"), primary_key=True
    )
    ledger_account_id: Mapped[int] = mapped_column(
        ForeignKey("ledger_accounts.id"), primary_key=True
    )
    entries_sum: Mapped[int] = mapped_column(BigInteger)


APPEND_ONLY_TABLES = (
    "usage_events",
    "ledger_transfers",
    "ledger_entries",
    "ledger_checkpoints",
    "ledger_checkpoint_sums",
)


class ProviderStatus(StrEnum):
    online = "online"  # in the cluster, taking requests
    paused = "paused"  # outside its schedule, or its owner is using the GPU
    draining = "draining"  # leaving: finishing in-flight requests
    offline = "offline"  # no heartbeat (or never joined)


class ProviderReview(StrEnum):
    """The operator's word on a provider (its agent never changes it): only an approved
    provider joins the cluster and takes traffic."""

    pending = "pending"  # created, not yet approved (by an operator, or by its attestation)
    approved = "approved"
    suspended = "suspended"  # no traffic, no sign-in, earnings held; `approve` lifts it
    revoked = "revoked"  # for good: its tokens are revoked and it is never approved again


class Provider(Base):
    """A provider's node: the GPU it lends, its X25519 public key, trust tier and status.
    The id (`prv_…`) is the `darkgpu.io/provider-id` node label and `usage_events.provider_id`."""

    __tablename__ = "providers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    x25519_public_key: Mapped[str | None] = mapped_column(String(64))  # base64, 32 bytes
    gpu_name: Mapped[str | None] = mapped_column(String(128))
    vram_gb: Mapped[float | None] = mapped_column(Float)
    gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    driver_version: Mapped[str | None] = mapped_column(String(32))
    cuda_version: Mapped[str | None] = mapped_column(String(16))
    cc_state: Mapped[str] = mapped_column(String(16), default=CcState.unknown.value)
    trust_tier: Mapped[str] = mapped_column(String(16), default="basic")
    cc_evidence: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    price_floor_pct: Mapped[int] = mapped_column(Integer, default=0)
    schedule: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=ProviderStatus.offline.value)
    review: Mapped[str] = mapped_column(String(16), default=ProviderReview.pending.value)
    reviewed_at: Mapped[datetime | None]
    review_note: Mapped[str | None] = mapped_column(String(500))
    last_heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        CheckConstraint(
            "status IN (" + ", ".join(f"'{s.value}'" for s in ProviderStatus) + ")",
            name="status",
        ),
        CheckConstraint(
            "review IN (" + ", ".join(f"'{s.value}'" for s in ProviderReview) + ")",
            name="review",
        ),
        CheckConstraint("trust_tier IN ('basic', 'verified')", name="trust_tier"),
        CheckConstraint(
            "cc_state IN (" + ", ".join(f"'{s.value}'" for s in CcState) + ")", name="cc_state"
        ),
        CheckConstraint("price_floor_pct >= 0 AND price_floor_pct <= 1000", name="price_floor"),
        CheckConstraint("gpu_count >= 0", name="gpu_count"),
    )


class ProviderToken(Base):
    """A provider agent's credential (`dgpp-…`): only its SHA-256 is stored."""

    __tablename__ = "provider_tokens"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    provider_id: Mapped[str] = mapped_column(ForeignKey("providers.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


# --- Payments (issue 4): passwords, Stripe events and purchases, payouts -------------------


class AccountPassword(Base):
    """An account's console password, as an argon2id PHC string (never the password)."""

    __tablename__ = "account_passwords"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class StripeEvent(Base):
    """A webhook event handled, written in the same transaction as its effects: an event whose
    id is here is never applied again."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    stripe_created: Mapped[int] = mapped_column(BigInteger)  # the event's `created`, epoch s
    outcome: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(String(500))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class PaymentStatus(StrEnum):
    open = "open"  # Checkout Session created, not paid yet
    paid = "paid"  # credits granted
    failed = "failed"  # the delayed payment failed


class StripePayment(Base):
    """One credit-bundle purchase (a Checkout Session and its PaymentIntent), with what was
    refunded and disputed so far (cumulative cents) and what that took back."""

    __tablename__ = "stripe_payments"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    bundle: Mapped[str] = mapped_column(String(32))
    checkout_session_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    payment_intent_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), default=PaymentStatus.open.value)
    refunded_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    disputed_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    clawed_back_nusd: Mapped[int] = mapped_column(BigInteger, default=0)
    unrecovered_nusd: Mapped[int] = mapped_column(BigInteger, default=0)
    # the customer chose a capped budget at checkout: the bundle's daily cap applies
    capped_budget: Mapped[bool] = mapped_column(Boolean, default=False)
    paid_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        CheckConstraint(
            "amount_cents >= 0 AND refunded_cents >= 0 AND disputed_cents >= 0", name="amounts"
        ),
    )


class StripeMovement(Base):
    """Money that moved at Stripe (a charge, refund, dispute, reinstated dispute or Connect
    transfer), as the webhooks and the payout run saw it. `clearing_nusd` is the change it
    makes to the payment-clearing ledger account; `key` is its ledger transfer's key."""

    __tablename__ = "stripe_movements"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    key: Mapped[str] = mapped_column(String(255), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    stripe_id: Mapped[str] = mapped_column(String(255))
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    clearing_nusd: Mapped[int] = mapped_column(BigInteger)
    account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id"))
    provider_id: Mapped[str | None] = mapped_column(String(64))
    event_id: Mapped[str | None] = mapped_column(String(255))
    occurred_at: Mapped[datetime]

    __table_args__ = (CheckConstraint("amount_cents > 0", name="positive"),)


class AccountFlag(Base):
    """Something an operator should look at: a refund or dispute that found the credits
    already spent (`unrecovered_nusd` could not be clawed back)."""

    __tablename__ = "account_flags"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    reason: Mapped[str] = mapped_column(String(32))
    stripe_id: Mapped[str] = mapped_column(String(255))
    unrecovered_nusd: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None]


class PayoutAccount(Base):
    """The Stripe Connect (Express) account of an account that owns providers: one per owner,
    paying every provider it owns. `stripe_updated_s` is the `created` time of the newest
    `account.updated` event applied, so an older event arriving late changes nothing."""

    __tablename__ = "payout_accounts"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    stripe_account_id: Mapped[str] = mapped_column(String(255), unique=True)
    payouts_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    details_submitted: Mapped[bool] = mapped_column(Boolean, default=False)
    stripe_updated_s: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class PayoutStatus(StrEnum):
    pending = "pending"  # money moved to payouts-pending; the transfer's outcome not known
    paid = "paid"  # Stripe made the transfer
    failed = "failed"  # Stripe refused it; the money is payable again


class Payout(Base):
    """A provider's payout for one ISO week (`2026-W03`). A refused transfer may be tried
    again (`attempt` + 1, a new idempotency key); an unanswered one only with the same key."""

    __tablename__ = "payouts"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    provider_id: Mapped[str] = mapped_column(ForeignKey("providers.id"), index=True)
    week: Mapped[str] = mapped_column(String(8))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    stripe_account_id: Mapped[str] = mapped_column(String(255))
    idempotency_key: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    transfer_id: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("provider_id", "week", name="uq_payouts_provider_week"),
        CheckConstraint("amount_cents > 0", name="positive"),
    )


class PayoutRun(Base):
    """A weekly payout run (the automatic schedule runs each week once)."""

    __tablename__ = "payout_runs"

    week: Mapped[str] = mapped_column(String(8), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class UsageStrike(Base):
    """A request whose engine reported more completion tokens than the ingress counted in what
    it delivered, beyond the tolerance: recorded against the serving provider."""

    __tablename__ = "usage_strikes"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    provider_id: Mapped[str] = mapped_column(String(64), index=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    model: Mapped[str] = mapped_column(String(128))
    reported_tokens: Mapped[int] = mapped_column(BigInteger)
    counted_tokens: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ProviderHour(Base):
    """An hour (UTC, its start) in which the provider's agent said it was online: its uptime
    (`cluster.market`). One row per provider and hour, written by its heartbeats."""

    __tablename__ = "provider_hours"

    provider_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    hour: Mapped[datetime] = mapped_column(primary_key=True)


class EnterpriseInquiry(Base):
    """The enterprise contact form's submissions, for the operator to answer."""

    __tablename__ = "enterprise_inquiries"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(320))
    company: Mapped[str] = mapped_column(String(200))
    message: Mapped[str] = mapped_column(String(4000))
    account_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    handled_at: Mapped[datetime | None]


class JoinTicket(Base):
    """A one-time ticket (stored hashed) a provider redeems to bind one Ray node to itself."""

    __tablename__ = "join_tickets"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    ticket_hash: Mapped[str] = mapped_column(String(64), unique=True)
    provider_id: Mapped[str] = mapped_column(ForeignKey("providers.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    node_id: Mapped[str | None] = mapped_column(String(64))


class ProviderNode(Base):
    """A Ray node bound to the provider whose ticket it redeemed: the only provider whose
    replicas on that node get traffic."""

    __tablename__ = "provider_nodes"

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    provider_id: Mapped[str] = mapped_column(ForeignKey("providers.id"), index=True)
    bound_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the catalog models the provider lets this node serve, a JSON list; empty: any that fits
    models: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")
