"""Account services: accounts, API keys, credits, limits and caps.

Each function commits to SQL (the truth) first and then updates Redis (the fast copy) when a
Redis client is given. If Redis holds no billing state yet (`dg:ready` missing: a fresh or
wiped Redis), the whole Redis state is rebuilt from SQL instead, so a partial Redis never
answers for accounts it does not know. If the Redis write fails after the SQL commit, the
error propagates and `darkgpu admin redis rebuild` (or the billing actor) repairs Redis.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from billing import ledger
from billing import redis_state as rs
from billing.keys import generate_key
from billing.money import MAX_BALANCE_NUSD
from billing.plans import Plans
from billing.schema import (
    Account,
    AccountLimits,
    AccountStatus,
    ApiKey,
    CustomerCap,
    utcnow,
)
from cluster.labels import TrustTier

if TYPE_CHECKING:
    import redis


class AccountError(ValueError):
    pass


class _Unset(Enum):
    UNSET = "unset"


UNSET = _Unset.UNSET


@dataclass(frozen=True)
class AccountInfo:
    id: int
    email: str
    plan: str
    status: str
    created_at: str
    balance_nusd: int
    default_trust_tier: str | None = None  # what its requests inherit; None: any tier

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KeyInfo:
    id: int
    account_id: int
    prefix: str
    name: str | None
    created_at: str
    revoked_at: str | None
    key: str | None = None  # the secret: only in the answer to create_key, shown once
    last_used_at: str | None = None  # the newest request billed to it (set by the meter)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "key" or v is not None}


def _iso(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC (SQLite hands timestamps back without their zone)."""
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


def _account_info(session: Session, account: Account) -> AccountInfo:
    return AccountInfo(
        id=account.id,
        email=account.email,
        plan=account.plan,
        status=account.status,
        created_at=_iso(account.created_at) or "",
        balance_nusd=ledger.balance(session, ledger.customer_credits(account.id)),
        default_trust_tier=account.default_trust_tier,
    )


def _key_info(row: ApiKey, secret: str | None = None) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        account_id=row.account_id,
        prefix=row.prefix,
        name=row.name,
        created_at=_iso(row.created_at) or "",
        revoked_at=_iso(row.revoked_at),
        key=secret,
        last_used_at=_iso(row.last_used_at),
    )


def _require_account(session: Session, account_id: int) -> Account:
    account = session.get(Account, account_id)
    if account is None:
        raise AccountError(f"no account {account_id}")
    return account


def _redis_ready(engine: Engine, r: redis.Redis | None) -> bool:
    """True when incremental Redis updates apply; rebuilds Redis first if it is empty."""
    if r is None:
        return False
    if rs.is_ready(r):
        return True
    from billing.rebuild import rebuild

    rebuild(engine, r)
    return False


def publish_account_state(session: Session, r: redis.Redis, account_id: int) -> None:
    account = _require_account(session, account_id)
    limits = session.get(AccountLimits, account_id)
    rs.publish_account(
        r,
        account_id,
        plan=account.plan,
        status=account.status,
        requests_per_minute=limits.requests_per_minute if limits else None,
        tokens_per_day=limits.tokens_per_day if limits else None,
        trust_tier=account.default_trust_tier,
    )
    caps = session.execute(
        select(CustomerCap.customer_tag, CustomerCap.tokens_per_day).where(
            CustomerCap.account_id == account_id
        )
    )
    rs.publish_tag_caps(r, account_id, {tag: n for tag, n in caps})


def create_account(
    engine: Engine,
    r: redis.Redis | None,
    plans: Plans,
    *,
    email: str,
    plan: str | None = None,
) -> AccountInfo:
    """A new account on `plan` (default: the plans file's default); the plan's signup grant
    is posted once, with idempotency key `signup:<account id>`."""
    email = email.strip().lower()
    if "@" not in email or len(email) > 320:
        raise AccountError(f"not an email address: {email!r}")
    plan = plan or plans.default_plan
    grant = plans.get(plan).signup_grant_nusd
    with Session(engine) as session, session.begin():
        if session.scalar(select(Account.id).where(Account.email == email)) is not None:
            raise AccountError(f"an account with email {email} already exists")
        account = Account(email=email, plan=plan, status=AccountStatus.active.value)
        session.add(account)
        session.flush()
        ledger.ensure_account(session, ledger.customer_credits(account.id))
        if grant:
            ledger.post_transfer(
                session,
                idempotency_key=f"signup:{account.id}",
                kind="signup_grant",
                legs=[
                    ledger.Leg(
                        ledger.PROMOTIONAL_GRANTS, ledger.customer_credits(account.id), grant
                    )
                ],
                memo=f"{plan} plan signup grant",
            )
        info = _account_info(session, account)
    if _redis_ready(engine, r):
        assert r is not None
        with Session(engine) as session:
            publish_account_state(session, r, info.id)
        if grant:
            rs.add_balance(r, info.id, grant)
    return info


def get_account(engine: Engine, account_id: int) -> AccountInfo:
    with Session(engine) as session:
        return _account_info(session, _require_account(session, account_id))


def find_account(engine: Engine, email: str) -> AccountInfo | None:
    with Session(engine) as session:
        account = session.scalar(select(Account).where(Account.email == email.strip().lower()))
        return None if account is None else _account_info(session, account)


def create_key(
    engine: Engine, r: redis.Redis | None, *, account_id: int, name: str | None = None
) -> KeyInfo:
    """A new API key; the returned KeyInfo.key is the secret, never stored and never shown
    again."""
    new = generate_key()
    with Session(engine) as session, session.begin():
        account = _require_account(session, account_id)
        if account.status != AccountStatus.active.value:
            raise AccountError(f"account {account_id} is {account.status}")
        row = ApiKey(account_id=account_id, key_hash=new.key_hash, prefix=new.prefix, name=name)
        session.add(row)
        session.flush()
        info = _key_info(row, new.secret)
    if _redis_ready(engine, r):
        assert r is not None
        rs.publish_key(r, new.key_hash, account_id=account_id, key_id=info.id)
    return info


def list_keys(engine: Engine, account_id: int) -> list[KeyInfo]:
    with Session(engine) as session:
        rows = session.scalars(
            select(ApiKey).where(ApiKey.account_id == account_id).order_by(ApiKey.id)
        )
        return [_key_info(row) for row in rows]


def revoke_key(
    engine: Engine,
    r: redis.Redis | None,
    *,
    key_id: int | None = None,
    prefix: str | None = None,
    account_id: int | None = None,
) -> KeyInfo:
    """Revoke a key by id or by its display prefix (which must match exactly one key). The key
    is removed from Redis at once, so every ingress refuses it on its next request. With
    `account_id`, only a key of that account is revoked (another's is "no key")."""
    if (key_id is None) == (prefix is None):
        raise AccountError("give exactly one of key id or prefix")
    with Session(engine) as session, session.begin():
        if key_id is not None:
            row = session.get(ApiKey, key_id)
            if row is None or account_id not in (None, row.account_id):
                raise AccountError(f"no key {key_id}")
        else:
            query = select(ApiKey).where(ApiKey.prefix == prefix)
            if account_id is not None:
                query = query.where(ApiKey.account_id == account_id)
            rows = list(session.scalars(query))
            if len(rows) != 1:
                raise AccountError(f"{len(rows)} keys have the prefix {prefix!r}")
            row = rows[0]
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        key_hash = row.key_hash
        session.flush()
        info = _key_info(row)
    if _redis_ready(engine, r):
        assert r is not None
        rs.unpublish_key(r, key_hash)
    return info


def requests_per_minute(engine: Engine, plans: Plans, account_id: int) -> int | None:
    """The account's requests/min limit: its override, else its plan's."""
    with Session(engine) as session:
        account = _require_account(session, account_id)
        limits = session.get(AccountLimits, account_id)
        if limits is not None and limits.requests_per_minute is not None:
            return limits.requests_per_minute
        plan = plans.plans.get(account.plan)
        return plan.requests_per_minute if plan else None


def grant_credits(
    engine: Engine,
    r: redis.Redis | None,
    *,
    account_id: int,
    amount_nusd: int,
    idempotency_key: str | None = None,
    source: str = "promotional",
    memo: str | None = None,
) -> int | None:
    """Credit the account from promotional grants (or, `source="payment"`, from payment
    clearing). Returns the transfer id, or None when the idempotency key was already used."""
    if amount_nusd <= 0:
        raise AccountError("a grant must be a positive amount")
    sources = {"promotional": ledger.PROMOTIONAL_GRANTS, "payment": ledger.PAYMENT_CLEARING}
    if source not in sources:
        raise AccountError(f"unknown credit source {source!r}")
    key = idempotency_key or f"grant:{uuid.uuid4()}"
    credits = ledger.customer_credits(account_id)
    with Session(engine) as session, session.begin():
        _require_account(session, account_id)
        if ledger.balance(session, credits) + amount_nusd > MAX_BALANCE_NUSD:
            raise AccountError("the balance would exceed the largest supported balance")
        transfer_id = ledger.post_transfer(
            session,
            idempotency_key=key,
            kind=f"{source}_grant",
            legs=[ledger.Leg(sources[source], credits, amount_nusd)],
            memo=memo,
        )
    if transfer_id is not None and _redis_ready(engine, r):
        assert r is not None
        rs.add_balance(r, account_id, amount_nusd)
    return transfer_id


def set_limits(
    engine: Engine,
    r: redis.Redis | None,
    *,
    account_id: int,
    requests_per_minute: int | None | _Unset = UNSET,
    tokens_per_day: int | None | _Unset = UNSET,
) -> None:
    """Per-account overrides; None returns that limit to the plan's value."""
    with Session(engine) as session, session.begin():
        _require_account(session, account_id)
        limits = session.get(AccountLimits, account_id)
        if limits is None:
            limits = AccountLimits(account_id=account_id)
            session.add(limits)
        if requests_per_minute is not UNSET:
            if requests_per_minute is not None and requests_per_minute < 1:
                raise AccountError("requests per minute must be at least 1")
            limits.requests_per_minute = requests_per_minute
        if tokens_per_day is not UNSET:
            if tokens_per_day is not None and tokens_per_day < 0:
                raise AccountError("tokens per day must be >= 0")
            limits.tokens_per_day = tokens_per_day
        limits.updated_at = utcnow()
    _publish(engine, r, account_id)


def set_customer_cap(
    engine: Engine,
    r: redis.Redis | None,
    *,
    account_id: int,
    customer_tag: str,
    tokens_per_day: int | None,
) -> None:
    """Cap one customer tag's tokens per UTC day (`*`: every tag without its own cap);
    None removes the cap."""
    if not customer_tag or len(customer_tag) > 256:
        raise AccountError("a customer tag is 1..256 characters")
    if tokens_per_day is not None and tokens_per_day < 0:
        raise AccountError("tokens per day must be >= 0")
    with Session(engine) as session, session.begin():
        _require_account(session, account_id)
        cap = session.scalar(
            select(CustomerCap).where(
                CustomerCap.account_id == account_id, CustomerCap.customer_tag == customer_tag
            )
        )
        if tokens_per_day is None:
            if cap is not None:
                session.delete(cap)
        elif cap is None:
            session.add(
                CustomerCap(
                    account_id=account_id, customer_tag=customer_tag, tokens_per_day=tokens_per_day
                )
            )
        else:
            cap.tokens_per_day = tokens_per_day
            cap.updated_at = utcnow()
    _publish(engine, r, account_id)


def set_plan(
    engine: Engine, r: redis.Redis | None, plans: Plans, *, account_id: int, plan: str
) -> None:
    plans.get(plan)
    with Session(engine) as session, session.begin():
        _require_account(session, account_id).plan = plan
    _publish(engine, r, account_id)


def set_status(engine: Engine, r: redis.Redis | None, *, account_id: int, status: str) -> None:
    status = AccountStatus(status).value
    with Session(engine) as session, session.begin():
        _require_account(session, account_id).status = status
    _publish(engine, r, account_id)


def set_default_tier(
    engine: Engine, r: redis.Redis | None, *, account_id: int, tier: str | None
) -> None:
    """The trust tier the account's requests inherit when they name none (None: any)."""
    tier = None if tier is None else TrustTier(tier).value
    with Session(engine) as session, session.begin():
        _require_account(session, account_id).default_trust_tier = tier
    _publish(engine, r, account_id)


def _publish(engine: Engine, r: redis.Redis | None, account_id: int) -> None:
    if _redis_ready(engine, r):
        assert r is not None
        with Session(engine) as session:
            publish_account_state(session, r, account_id)
