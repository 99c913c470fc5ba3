"""Changing a console password, and resetting a forgotten one by email.

Change: the signed-in visitor gives the current password and a new one; the current one is
checked with argon2id as sign-in checks it. Reset: a link mailed to the account's address
carries a one-time token (32 random bytes from `secrets`); the money Redis keeps only its
SHA-256 (`dg:pwreset:<sha256>` → the account id) for `RESET_TTL_S`, and the account's
one outstanding token (`dg:pwreset:acct:<id>`): asking again replaces it, and changing or
resetting the password voids it. Following the link shows a form; only posting that form
uses the token up (GETDEL), so a mail scanner that fetches the link spends nothing.

Asking for a reset answers the same whether the address has an account or not (the caller
says "if an account uses that address, we sent a link" in both cases, and sends the mail
after answering), so the form tells nobody which addresses are registered. Mail to one
address is capped (`MAILS_PER_ADDRESS` per `MAIL_WINDOW_S`, counted in the state Redis for
every address asked about, registered or not), so the form cannot flood an inbox.

The routes end the account's console sessions after a change (all but the one that made it)
and after a reset (all of them): whoever held a session with the old password loses it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from billing import mail, signup
from core.schema import Account
from kernel.errors import InvalidRequest

if TYPE_CHECKING:
    import redis

    from core.settings import Settings

RESET_TTL_S = 3600
RESET_PATH = "/console/reset/confirm"
MAILS_PER_ADDRESS = 3
MAIL_WINDOW_S = 3600
_TOKEN = "dg:pwreset:"
_OUTSTANDING = "dg:pwreset:acct:"
_MAILS = "dg:pwreset:mails:"
MAX_TOKEN_LEN = 128


class WrongPassword(InvalidRequest):
    """The current password given to change it is not the account's."""


class InvalidResetLink(InvalidRequest):
    """The reset token is unknown, used, replaced or expired."""


@dataclass(frozen=True)
class PendingReset:
    """A reset link to mail: made by `start_reset`, sent by `send_reset`."""

    email: str
    token: str


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def change_password(engine: Engine, *, account_id: int, current: str, new: str) -> None:
    """Replace the password when `current` is the account's; raises WrongPassword, or
    SignupError for a new password that is too short or too long."""
    signup.check_password(new)
    if not signup.password_matches(engine, account_id, current):
        raise WrongPassword(
            "The current password is not right.", param="current_password", code="wrong_password"
        )
    signup.set_password(engine, account_id, new)


def void_reset(r: redis.Redis, account_id: int) -> None:
    """Forget the account's outstanding reset link, if any."""
    outstanding = r.getdel(_OUTSTANDING + str(account_id))
    if outstanding is not None:
        r.delete(_TOKEN + (outstanding.decode() if isinstance(outstanding, bytes)
                           else str(outstanding)))  # fmt: skip


def start_reset(
    engine: Engine, r: redis.Redis, state: redis.Redis, *, email: str
) -> PendingReset | None:
    """A reset link for the account of `email`, its token stored (replacing any earlier
    one): None when no account uses the address, or the address had its mails for the
    window. The caller answers the same either way."""
    address = email.strip().lower()
    if not address or len(address) > 320:
        return None
    mails = _MAILS + _digest(address)
    pipe = state.pipeline(transaction=True)
    pipe.incr(mails)
    pipe.expire(mails, MAIL_WINDOW_S, nx=True)
    sent = int(pipe.execute()[0])
    with Session(engine) as session:
        account_id = session.scalar(
            select(Account.id).where(Account.email == address, Account.deleted_at.is_(None))
        )
    if account_id is None or sent > MAILS_PER_ADDRESS:
        return None
    token = secrets.token_urlsafe(32)
    hashed = _digest(token)
    void_reset(r, account_id)
    pipe = r.pipeline(transaction=True)
    pipe.set(_TOKEN + hashed, str(account_id), ex=RESET_TTL_S)
    pipe.set(_OUTSTANDING + str(account_id), hashed, ex=RESET_TTL_S)
    pipe.execute()
    return PendingReset(address, token)


def send_reset(settings: Settings, pending: PendingReset) -> None:
    link = mail.public_link(settings, f"{RESET_PATH}?token={pending.token}")
    mail.send(
        settings,
        to=pending.email,
        subject="Reset your DarkGPU password",
        body="Someone (we hope you) asked to reset the password of the DarkGPU account for "
        f"this address. Follow this link to choose a new one:\n\n{link}\n\n"
        f"The link works once, for {RESET_TTL_S // 60} minutes. Choosing a new password signs "
        "out every console session. If you did not ask, ignore this message: your password "
        "stays as it is.\n",
    )


def complete_reset(engine: Engine, r: redis.Redis, *, token: str, new: str) -> int:
    """Set the password of the token's account, using the token up: its account id. Raises
    SignupError for an unusable new password (the token is kept) or InvalidResetLink."""
    signup.check_password(new)
    found = r.getdel(_TOKEN + _digest(token)) if 0 < len(token) <= MAX_TOKEN_LEN else None
    if found is None:
        raise InvalidResetLink(
            "This reset link is not valid: it was used, replaced by a newer one, or has "
            "expired. Ask for a new one.",
            param="token",
            code="invalid_reset_link",
        )
    account_id = int(found)
    with Session(engine) as session:
        account = session.get(Account, account_id)
        gone = account is None or account.deleted_at is not None
    if gone:
        raise InvalidResetLink("This reset link is not valid.", param="token",
                               code="invalid_reset_link")  # fmt: skip
    signup.set_password(engine, account_id, new)
    r.delete(_OUTSTANDING + str(account_id))
    return account_id
