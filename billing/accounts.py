"""Account services: accounts, API keys, credits, limits and caps.

Each function commits to SQL (the truth) first and then, when a Redis client is given,
brings Redis (the fast copy) along through `billing.sync.after_commit`: its own update, or a
rebuild from SQL when Redis holds no billing state yet. If the Redis write fails after the
SQL commit, the error propagates and `darkgpu admin redis rebuild` (or the billing actor)
repairs Redis.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.orm import Session

from billing import ledger, sync
from billing import redis_state as rs
from billing.plans import Plans, daily_cap
from core.schema import (
    Account,
    AccountLimits,
    AccountPassword,
    AccountStatus,
    ApiKey,
    CustomerCap,
    utcnow,
)
from kernel import redis_keys as rk
from kernel.errors import InvalidRequest
from kernel.labels import TrustTier
from kernel.money import MAX_BALANCE_NUSD
from kernel.tokens import generate_key

# The largest daily token cap anyone may set (far above any use; exact in Lua's doubles and
# in a BIGINT column).
MAX_TOKENS_PER_DAY = 10**12
# Customer tags an account may cap (each is a field of its Redis record: bounded)
MAX_CUSTOMER_CAPS = 1000

if TYPE_CHECKING:
    import redis


class AccountError(InvalidRequest):
    """An account operation refused: the message says why (the operator's CLI shows it)."""


class _Unset(Enum):
    UNSET = "unset"


UNSET = _Unset.UNSET
KEY_NAME_MAX = 100


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
    expires_at: str | None = None  # refused from then on (None: never expires)
    tokens_per_day: int | None = None  # the key's own daily cap (None: none)

    def expired(self, now: datetime | None = None) -> bool:
        if self.expires_at is None:
            return False
        return datetime.fromisoformat(self.expires_at) <= (now or utcnow())

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "key" or v is not None}


def _iso(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC (every moment column reads back as aware UTC: core.schema)."""
    return None if moment is None else moment.isoformat()


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
        expires_at=_iso(row.expires_at),
        tokens_per_day=row.tokens_per_day,
    )


def _require_account(session: Session, account_id: int) -> Account:
    account = session.get(Account, account_id)
    if account is None:
        raise AccountError(f"no account {account_id}")
    return account


def publish_account_state(engine: Engine, r: redis.Redis, account_id: int) -> None:
    """The account's plan, status, limits, tier and tag caps, from SQL into Redis."""
    with Session(engine) as session:
        account = _require_account(session, account_id)
        limits = session.get(AccountLimits, account_id)
        caps = session.execute(
            select(CustomerCap.customer_tag, CustomerCap.tokens_per_day).where(
                CustomerCap.account_id == account_id
            )
        ).all()
    rs.publish_account(
        r,
        account_id,
        plan=account.plan,
        status=account.status,
        requests_per_minute=limits.requests_per_minute if limits else None,
        tokens_per_day=limits.tokens_per_day if limits else None,
        trust_tier=account.default_trust_tier,
        own_tokens_per_day=limits.own_tokens_per_day if limits else None,
    )
    rs.publish_tag_caps(r, account_id, {tag: n for tag, n in caps})


def create_account(
    engine: Engine,
    r: redis.Redis | None,
    plans: Plans,
    *,
    email: str,
    plan: str | None = None,
    grant_signup: bool = True,
) -> AccountInfo:
    """A new account on `plan` (default: the plans file's default); the plan's signup grant
    is posted once, with idempotency key `signup:<account id>` — now, or with
    `grant_signup=False` later by `grant_signup_credits` (once its email is verified)."""
    email = email.strip().lower()
    if "@" not in email or len(email) > 320:
        raise AccountError(f"not an email address: {email!r}")
    plan = plan or plans.default_plan
    grant = plans.get(plan).signup_grant_nusd if grant_signup else 0
    with Session(engine) as session, session.begin():
        if session.scalar(select(Account.id).where(Account.email == email)) is not None:
            raise AccountError(f"an account with email {email} already exists")
        account = Account(email=email, plan=plan, status=AccountStatus.active.value)
        session.add(account)
        session.flush()
        ledger.ensure_account(session, ledger.customer_credits(account.id))
        if grant:
            _post_signup_grant(session, account.id, plan, grant)
        info = _account_info(session, account)

    def publish(r: redis.Redis) -> None:
        publish_account_state(engine, r, info.id)
        if grant:
            rs.add_balance(r, info.id, grant)

    sync.after_commit(engine, r, publish)
    return info


def grant_signup_credits(
    engine: Engine, r: redis.Redis | None, plans: Plans, *, account_id: int
) -> int:
    """The signup grant of the account's plan, if it was not posted yet (idempotency key
    `signup:<account id>`, as `create_account` posts it): nUSD granted now, else 0."""
    with Session(engine) as session, session.begin():
        account = _require_account(session, account_id)
        grant = plans.get(account.plan).signup_grant_nusd
        posted = grant and _post_signup_grant(session, account_id, account.plan, grant)
    if not posted:
        return 0
    sync.after_commit(engine, r, lambda r: rs.add_balance(r, account_id, grant))
    return grant


def _post_signup_grant(session: Session, account_id: int, plan: str, grant: int) -> bool:
    """Post the signup grant once (False: it was posted before)."""
    return (
        ledger.post_transfer(
            session,
            idempotency_key=f"signup:{account_id}",
            kind="signup_grant",
            legs=[
                ledger.Leg(ledger.PROMOTIONAL_GRANTS, ledger.customer_credits(account_id), grant)
            ],
            memo=f"{plan} plan signup grant",
        )
        is not None
    )


def get_account(engine: Engine, account_id: int) -> AccountInfo:
    with Session(engine) as session:
        return _account_info(session, _require_account(session, account_id))


def find_account(engine: Engine, email: str) -> AccountInfo | None:
    with Session(engine) as session:
        account = session.scalar(select(Account).where(Account.email == email.strip().lower()))
        return None if account is None else _account_info(session, account)


def create_key(
    engine: Engine,
    r: redis.Redis | None,
    *,
    account_id: int,
    name: str | None = None,
    expires_at: datetime | None = None,
) -> KeyInfo:
    """A new API key; the returned KeyInfo.key is the secret, never stored and never shown
    again. With `expires_at` (aware, in the future) the key is refused from then on: its
    Redis record expires then (EXPIREAT), and a rebuild from SQL skips it."""
    if expires_at is not None and (expires_at.tzinfo is None or expires_at <= utcnow()):
        raise AccountError("a key's expiry must be a moment in the future, with its zone")
    new = generate_key()
    with Session(engine) as session, session.begin():
        account = _require_account(session, account_id)
        if account.status != AccountStatus.active.value:
            raise AccountError(f"account {account_id} is {account.status}")
        row = ApiKey(
            account_id=account_id,
            key_hash=new.key_hash,
            prefix=new.prefix,
            name=name,
            expires_at=expires_at,
        )
        session.add(row)
        session.flush()
        info = _key_info(row, new.secret)
    sync.after_commit(
        engine,
        r,
        lambda r: publish_key(r, new.key_hash, account_id=account_id, key_id=info.id,
                              expires_at=expires_at),
    )  # fmt: skip
    return info


def publish_key(
    r: redis.Redis,
    key_hash: str,
    *,
    account_id: int,
    key_id: int,
    expires_at: datetime | None = None,
    tokens_per_day: int | None = None,
) -> None:
    """The key's Redis record, expiring with the key (`r` may be a pipeline)."""
    rs.publish_key(r, key_hash, account_id=account_id, key_id=key_id,
                   tokens_per_day=tokens_per_day)  # fmt: skip
    if expires_at is not None:
        r.pexpireat(rk.api_key(key_hash), expires_at)


def rename_key(engine: Engine, *, key_id: int, account_id: int, name: str) -> KeyInfo:
    """Rename one of the account's keys (another account's is "no key")."""
    name = name.strip()
    if not name or len(name) > KEY_NAME_MAX:
        raise AccountError(f"a key's name is 1 to {KEY_NAME_MAX} characters")
    with Session(engine) as session, session.begin():
        row = _key_of(session, key_id, account_id)
        row.name = name
        session.flush()
        return _key_info(row)


def _key_of(session: Session, key_id: int, account_id: int) -> ApiKey:
    """One of the account's keys, for a change (another account's is "no key")."""
    row = session.get(ApiKey, key_id)
    if row is None or row.account_id != account_id:
        raise AccountError(f"no key {key_id}")
    return row


def _check_cap(tokens_per_day: int | None) -> None:
    if tokens_per_day is not None and not 0 <= tokens_per_day <= MAX_TOKENS_PER_DAY:
        raise AccountError(f"a daily cap is 0..{MAX_TOKENS_PER_DAY:,} tokens")


def set_key_cap(
    engine: Engine,
    r: redis.Redis | None,
    *,
    key_id: int,
    account_id: int,
    tokens_per_day: int | None,
) -> KeyInfo:
    """One of the account's keys gets a daily token cap of its own (None removes it); another
    account's key is "no key". A revoked or expired key keeps no Redis record, and this never
    makes one (`rs.set_key_cap` changes only a record that exists)."""
    _check_cap(tokens_per_day)
    with Session(engine) as session, session.begin():
        row = _key_of(session, key_id, account_id)
        row.tokens_per_day = tokens_per_day
        session.flush()
        info, key_hash = _key_info(row), row.key_hash
    sync.after_commit(engine, r, lambda r: rs.set_key_cap(r, key_hash, tokens_per_day))
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
    sync.after_commit(engine, r, lambda r: rs.unpublish_key(r, key_hash))
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
    if transfer_id is not None:
        sync.after_commit(engine, r, lambda r: rs.add_balance(r, account_id, amount_nusd))
    return transfer_id


def set_limits(
    engine: Engine,
    r: redis.Redis | None,
    *,
    account_id: int,
    requests_per_minute: int | None | _Unset = UNSET,
    tokens_per_day: int | None | _Unset = UNSET,
    own_tokens_per_day: int | None | _Unset = UNSET,
) -> None:
    """Per-account overrides; None returns that limit to the plan's value. `tokens_per_day`
    is the operator's; `own_tokens_per_day` the customer's (`set_own_cap`)."""
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
        if own_tokens_per_day is not UNSET:
            _check_cap(own_tokens_per_day)
            limits.own_tokens_per_day = own_tokens_per_day
        limits.updated_at = utcnow()
    _publish(engine, r, account_id)


@dataclass(frozen=True)
class DailyCaps:
    """An account's daily token caps (None: none): `ceiling` is the plan's or the operator's
    (or a capped budget's), `own` the customer's; the tighter applies."""

    ceiling: int | None
    own: int | None

    @property
    def applies(self) -> int | None:
        return daily_cap(None, self.ceiling, self.own)


def daily_caps(engine: Engine, plans: Plans, account_id: int) -> DailyCaps:
    with Session(engine) as session:
        account = _require_account(session, account_id)
        limits = session.get(AccountLimits, account_id)
    plan = plans.plans.get(account.plan)
    operator = limits.tokens_per_day if limits else None
    ceiling = daily_cap(plan.tokens_per_day if plan else None, operator, None)
    return DailyCaps(ceiling, limits.own_tokens_per_day if limits else None)


def set_own_cap(
    engine: Engine, r: redis.Redis | None, *, account_id: int, tokens_per_day: int | None
) -> None:
    """The customer's own daily token cap (None removes it). It only ever lowers the cap that
    applies (`plans.daily_cap`): raising one is the operator's (`set_limits`)."""
    set_limits(engine, r, account_id=account_id, own_tokens_per_day=tokens_per_day)


def customer_caps(engine: Engine, account_id: int) -> dict[str, int]:
    """The account's customer-tag caps: tag -> tokens per day."""
    with Session(engine) as session:
        rows = session.execute(
            select(CustomerCap.customer_tag, CustomerCap.tokens_per_day)
            .where(CustomerCap.account_id == account_id)
            .order_by(CustomerCap.customer_tag)
        ).all()
    return {tag: n for tag, n in rows}


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
    _check_cap(tokens_per_day)
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
            count = select(func.count()).where(CustomerCap.account_id == account_id)
            if (session.scalar(count.select_from(CustomerCap)) or 0) >= MAX_CUSTOMER_CAPS:
                raise AccountError(f"an account has at most {MAX_CUSTOMER_CAPS:,} customer caps")
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


def set_status(
    engine: Engine,
    r: redis.Redis | None,
    *,
    account_id: int,
    status: str,
    sessions: redis.Redis | None = None,
) -> int:
    """Set the account's status. Suspending it refuses its keys on their next request
    (admission reads the status from Redis) and ends its console sessions, kept in the
    state Redis `sessions` (default: `r`): how many ended."""
    status = AccountStatus(status).value
    with Session(engine) as session, session.begin():
        _require_account(session, account_id).status = status
    _publish(engine, r, account_id)
    where = sessions if sessions is not None else r
    if where is None or status == AccountStatus.active.value:
        return 0
    return end_console_sessions(where, account_id)


def end_console_sessions(r: redis.Redis, account_id: int, *, keep: str | None = None) -> int:
    """Delete the account's console sessions (the console indexes them per account, with
    the secrets they stashed), all but the one whose token hash is `keep`: how many ended."""
    index = rk.console_sessions(account_id)
    hashes = [h.decode() if isinstance(h, bytes) else str(h) for h in r.smembers(index)]
    hashes = [h for h in hashes if h != keep]
    ended = int(r.delete(*(rk.console_session(h) for h in hashes))) if hashes else 0
    if keep is None:
        r.delete(index)
    elif hashes:
        r.srem(index, *hashes)
    if hashes:
        r.delete(*(rk.console_reveal(h) for h in hashes))
    return ended


def set_default_tier(
    engine: Engine, r: redis.Redis | None, *, account_id: int, tier: str | None
) -> None:
    """The trust tier the account's requests inherit when they name none (None: any)."""
    tier = None if tier is None else TrustTier(tier).value
    with Session(engine) as session, session.begin():
        _require_account(session, account_id).default_trust_tier = tier
    _publish(engine, r, account_id)


def set_operator(engine: Engine, *, account_id: int, operator: bool) -> None:
    """Make the account one of the operator's (the console's operator pages), or not. Only
    the operator's CLI calls it: nothing a customer sends reaches it."""
    with Session(engine) as session, session.begin():
        _require_account(session, account_id).operator = operator


def is_operator(engine: Engine, account_id: int) -> bool:
    with Session(engine) as session:
        account = session.get(Account, account_id)
        return bool(account is not None and account.operator and account.deleted_at is None)


def set_low_balance(engine: Engine, *, account_id: int, threshold_nusd: int | None) -> None:
    """The credit balance below which the account is emailed once (None: no email); a new
    threshold re-arms the alert (`billing.low_balance`)."""
    if threshold_nusd is not None and not 0 < threshold_nusd <= MAX_BALANCE_NUSD:
        raise AccountError("a low-balance threshold is a positive amount")
    with Session(engine) as session, session.begin():
        account = _require_account(session, account_id)
        account.low_balance_nusd = threshold_nusd
        account.low_balance_notified_at = None


def low_balance_of(engine: Engine, account_id: int) -> int | None:
    with Session(engine) as session:
        return _require_account(session, account_id).low_balance_nusd


DELETED_DOMAIN = "deleted.invalid"


def _deleted_email(account_id: int, email: str) -> str:
    """What a deleted account's email becomes: its id and a digest of the address (so that
    signing up again with it earns no second signup grant), never the address itself."""
    digest = hashlib.sha256(email.strip().lower().encode("utf-8")).hexdigest()[:32]
    return f"deleted-{account_id}-{digest}@{DELETED_DOMAIN}"


def email_was_deleted(engine: Engine, email: str) -> bool:
    """Whether an account with this address was deleted before."""
    digest = hashlib.sha256(email.strip().lower().encode("utf-8")).hexdigest()[:32]
    with Session(engine) as session:
        found = session.scalar(
            select(Account.id).where(
                Account.deleted_at.is_not(None),
                Account.email.like(f"deleted-%-{digest}@{DELETED_DOMAIN}"),
            )
        )
    return found is not None


def delete_account(
    engine: Engine, r: redis.Redis | None, *, account_id: int, sessions: redis.Redis | None = None
) -> int:
    """Delete an account as its owner asked: its email is scrubbed, its password and every
    key are gone (keys revoked, so they stay in the ledger's references), its status is
    suspended (admission refuses it even where Redis still knows a key), its low-balance
    alert is off and its console sessions end. Its ledger rows, usage events and purchases
    stay (the law keeps them); its remaining credits are not refunded (they are prepaid and
    non-refundable). Returns how many keys were revoked."""
    with Session(engine) as session, session.begin():
        account = _require_account(session, account_id)
        if account.deleted_at is not None:
            raise AccountError(f"account {account_id} is deleted already")
        account.deleted_at = utcnow()
        account.email = _deleted_email(account_id, account.email)
        account.status = AccountStatus.suspended.value
        account.low_balance_nusd = None
        account.low_balance_notified_at = None
        keys = list(
            session.scalars(
                select(ApiKey).where(ApiKey.account_id == account_id, ApiKey.revoked_at.is_(None))
            )
        )
        for key in keys:
            key.revoked_at = utcnow()
        hashes = [k.key_hash for k in keys]
        session.execute(delete(AccountPassword).where(AccountPassword.account_id == account_id))

    def unpublish(r: redis.Redis) -> None:
        for key_hash in hashes:
            rs.unpublish_key(r, key_hash)
        publish_account_state(engine, r, account_id)

    sync.after_commit(engine, r, unpublish)
    where = sessions if sessions is not None else r
    if where is not None:
        end_console_sessions(where, account_id)
    return len(hashes)


def _publish(engine: Engine, r: redis.Redis | None, account_id: int) -> None:
    sync.after_commit(engine, r, lambda r: publish_account_state(engine, r, account_id))
