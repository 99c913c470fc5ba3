"""Email verification: with SMTP configured (`Settings.smtp_host`), a new account's signup
credits wait until the link mailed to its address is followed, so a made-up address earns
nothing. Without SMTP (the local platform) signup grants them at once, as before.

The link carries a random token (32 bytes from `secrets`); Redis keeps only its SHA-256
(`dg:verify:<sha256>` → the account id) for `Settings.email_link_ttl_s`. Following the link
(`GET /v1/auth/verify?token=…`) deletes the token and posts the plan's signup grant under the
same idempotency key account creation uses (`signup:<account id>`), so it is granted once.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from billing import accounts, mail
from billing.plans import Plans
from kernel.errors import InvalidRequest

if TYPE_CHECKING:
    import redis
    from sqlalchemy import Engine

    from core.settings import Settings

log = logging.getLogger(__name__)
VERIFY_PATH = "/v1/auth/verify"
_PREFIX = "dg:verify:"
Mailer = Callable[[int, str], None]


class InvalidLink(InvalidRequest):
    """The link's token is unknown, used or expired."""


def _key(token: str) -> str:
    return _PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


def mailer_for(settings: Settings, r: redis.Redis) -> Mailer | None:
    """What signup calls to send the link, or None when verification is off (no SMTP)."""
    if not mail.enabled(settings):
        return None
    return lambda account_id, email: send_link(settings, r, account_id=account_id, email=email)


def send_link(settings: Settings, r: redis.Redis, *, account_id: int, email: str) -> None:
    token = secrets.token_urlsafe(32)
    r.set(_key(token), str(account_id), ex=settings.email_link_ttl_s)
    link = mail.public_link(settings, f"{VERIFY_PATH}?token={token}")
    mail.send(
        settings,
        to=email,
        subject="Confirm your email for DarkGPU",
        body="Follow this link to confirm your email address and receive your signup "
        f"credits:\n\n{link}\n\nThe link works once, for "
        f"{settings.email_link_ttl_s // 3600} hours. If you did not sign up, ignore this "
        "message.\n",
    )


def verify(engine: Engine, r: redis.Redis, plans: Plans, token: str) -> tuple[int, int]:
    """Follow a link: (the account id, nUSD of signup credits granted now — 0 if they were
    granted before). Raises InvalidLink for a token unknown, used or expired."""
    found = r.getdel(_key(token)) if token and len(token) <= 128 else None
    if found is None:
        raise InvalidLink(
            "This verification link is not valid, was used already or has expired.",
            code="invalid_verification_link",
            param="token",
        )
    account_id = int(found)
    return account_id, accounts.grant_signup_credits(engine, r, plans, account_id=account_id)
