"""Self-serve signup: email + password → an account on the default (free) plan, its signup
credits ($10, granted once by `billing.accounts.create_account` under the key
`signup:<account id>`), and a first API key, shown once.

Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106's second recommended
profile: 64 MiB, 3 passes, 4 lanes) and stored in `account_passwords`; `verify_password` is
what the console's login uses. The account, its password and its key are written to SQL first
(three commits: the account is made by the shared account service; if a later one failed,
`set_password` / `admin key create` complete it), then published to Redis.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing import accounts, sync
from billing import redis_state as rs
from billing.plans import Plans
from core.schema import Account, AccountPassword, utcnow
from kernel.errors import Conflict, InvalidRequest
from kernel.money import nusd_to_usd
from kernel.tokens import hash_key

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)
MIN_PASSWORD_LEN = 10
MAX_PASSWORD_LEN = 1024
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")
_hasher = PasswordHasher()  # argon2id


class SignupError(InvalidRequest):
    """Bad input: the message says what (shown to the user), `param` which field."""


class EmailTaken(SignupError, Conflict):
    """A 409: the email has an account already."""


@dataclass(frozen=True)
class SignupResult:
    account: accounts.AccountInfo
    key: accounts.KeyInfo
    # email verification: None (off), "sent" (credits follow the link), "not_sent"
    verification: str | None = None

    def to_json(self) -> dict[str, Any]:
        a = self.account
        return {
            "object": "account",
            "id": a.id,
            "email": a.email,
            "plan": a.plan,
            "status": a.status,
            "created_at": a.created_at,
            "credits_nusd": a.balance_nusd,
            "credits_usd": nusd_to_usd(a.balance_nusd),
            "email_verification": self.verification,
            "api_key": {
                "id": self.key.id,
                "name": self.key.name,
                "prefix": self.key.prefix,
                "key": self.key.key,
            },
        }


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LEN:
        raise SignupError(
            f"The password must be at least {MIN_PASSWORD_LEN} characters.",
            param="password",
            code="password_too_short",
        )
    if len(password) > MAX_PASSWORD_LEN:
        raise SignupError(
            f"The password must be at most {MAX_PASSWORD_LEN} characters.",
            param="password",
            code="password_too_long",
        )


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if len(email) > 320 or not _EMAIL.match(email):
        raise SignupError("Not a valid email address.", param="email", code="invalid_email")
    return email


def signup(
    engine: Engine,
    r: redis.Redis | None,
    plans: Plans,
    *,
    email: str,
    password: str,
    before_hash: Callable[[], None] | None = None,
    mailer: Callable[[int, str], None] | None = None,
) -> SignupResult:
    """Create the account (default plan, its signup grant once), store the password hash and
    make a first API key. Raises SignupError (bad input) or EmailTaken. `before_hash` runs
    once the input is valid and before the password is hashed (the caller's throttle: what it
    raises stops the signup there). With `mailer` (email verification on), the signup credits
    wait for the link it mails (`billing.email_verification`). An address whose account was
    deleted (`accounts.delete_account`) signs up again without signup credits."""
    email = normalize_email(email)
    check_password(password)
    if before_hash is not None:
        before_hash()
    digest = hash_password(password)  # before any write: the slow part
    if accounts.email_was_deleted(engine, email):  # back after deleting: no second grant
        mailer = None
        grant = False
    else:
        grant = mailer is None
    try:
        info = accounts.create_account(engine, None, plans, email=email, grant_signup=grant)
    except IntegrityError:  # a concurrent signup with the same email won
        raise _taken() from None
    except accounts.AccountError as exc:
        if "already exists" in str(exc):
            raise _taken() from None
        raise SignupError(str(exc), param="email", code="invalid_email") from None
    set_password(engine, info.id, digest, hashed=True)
    key = accounts.create_key(engine, None, account_id=info.id, name="default")
    # SQL is complete: if Redis cannot be written the signup still stands, and the key works
    # once Redis is rebuilt (`darkgpu admin redis rebuild`, or the billing actor)
    try:
        sync.after_commit(engine, r, lambda r: _publish(engine, r, info, key))
    except Exception:
        log.exception("signup of account %d not published to Redis; rebuild Redis", info.id)
    if mailer is None:
        return SignupResult(info, key)
    try:
        mailer(info.id, email)
    except Exception:  # the account stands; its credits wait for a link that was not sent
        log.exception("verification mail to account %d not sent", info.id)
        return SignupResult(info, key, verification="not_sent")
    return SignupResult(info, key, verification="sent")


def _publish(
    engine: Engine, r: redis.Redis, info: accounts.AccountInfo, key: accounts.KeyInfo
) -> None:
    """Make the new account, its credits and key known to Redis."""
    accounts.publish_account_state(engine, r, info.id)
    if info.balance_nusd:
        rs.add_balance(r, info.id, info.balance_nusd)
    assert key.key is not None  # create_key's answer carries the secret
    rs.publish_key(r, hash_key(key.key), account_id=info.id, key_id=key.id)


def _taken() -> EmailTaken:
    return EmailTaken(
        "An account with this email already exists.", param="email", code="email_taken"
    )


def set_password(engine: Engine, account_id: int, password: str, *, hashed: bool = False) -> None:
    digest = password if hashed else hash_password(password)
    if not hashed:
        check_password(password)
    with Session(engine) as session, session.begin():
        row = session.get(AccountPassword, account_id)
        if row is None:
            session.add(AccountPassword(account_id=account_id, password_hash=digest))
        else:
            row.password_hash = digest
            row.updated_at = utcnow()


def verify_password(engine: Engine, email: str, password: str) -> int | None:
    """The account id when the password is right, else None (also for unknown emails, after
    the same work, so timing does not tell whether an email is registered)."""
    with Session(engine) as session:
        found = session.execute(
            select(Account.id, AccountPassword.password_hash)
            .join(AccountPassword, AccountPassword.account_id == Account.id)
            .where(Account.email == email.strip().lower())
        ).first()
    digest = found[1] if found else _dummy_hash()
    try:
        _hasher.verify(digest, password)
    except (VerificationError, InvalidHashError):
        return None
    if found is None:
        return None
    if _hasher.check_needs_rehash(digest):
        set_password(engine, found[0], hash_password(password), hashed=True)
    return int(found[0])


def password_matches(engine: Engine, account_id: int, password: str) -> bool:
    """Whether `password` is the account's (the same work when it has none)."""
    with Session(engine) as session:
        digest = session.scalar(
            select(AccountPassword.password_hash).where(AccountPassword.account_id == account_id)
        )
    try:
        _hasher.verify(digest or _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return False
    return digest is not None


@cache
def _dummy_hash() -> str:
    return _hasher.hash("not the password of anyone")
