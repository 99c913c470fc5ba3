"""The account's daily token caps, set by the customer (`billing.accounts`).

    GET  /console/caps              the cap that applies, today's use, the customer-tag caps
    POST /console/caps/daily        the customer's own daily cap (empty: none of its own)
    POST /console/caps/customers    a customer tag's daily cap (`X-Customer-Id`; `*`: every
                                    tag without its own); empty tokens: the tag's cap removed
    POST /console/caps/keys         one API key's daily cap (empty: none)

The customer's own daily cap only lowers the one that applies (the plan's, a capped budget's
or the operator's): raising that is the operator's (`darkgpu admin cap set`). Tag caps
and key caps are the customer's own sub-budgets. Each takes effect at the next request (429
`daily_cap_exceeded` past it), and resets at 00:00 UTC.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from billing import accounts, reports
from kernel.errors import NotFound
from serve_app.console.web import (
    PREFIX,
    ConsoleRoute,
    Form,
    SignedIn,
    Svc,
    account_of,
    page,
    redirect,
)

router = APIRouter(route_class=ConsoleRoute)
TAG_MAX = 256
NOTICES = {
    "daily": "Saved: your daily cap applies from your next request.",
    "customer": "Saved: the customer's daily cap applies from its next request.",
    "key": "Saved: the key's daily cap applies from its next request.",
}
BAD_TOKENS = (
    f"Give a whole number of tokens from 0 to {accounts.MAX_TOKENS_PER_DAY:,}, or leave it "
    "empty to remove the cap."
)


def caps_page(session: SignedIn, svc: Svc, status: int = 200, **context: Any) -> Response:
    account_id = account_of(session)
    context.setdefault("error", None)
    context.setdefault("notice", None)
    return page(
        "caps.html", session, status=status, active="caps",
        caps=accounts.daily_caps(svc.db, svc.plans, account_id),
        summary=reports.credits_summary(svc.db, svc.redis, svc.plans, account_id),
        customers=accounts.customer_caps(svc.db, account_id), tag_max=TAG_MAX,
        keys=[k for k in accounts.list_keys(svc.db, account_id)
              if k.revoked_at is None and not k.expired()], **context,
    )  # fmt: skip


def parse_tokens(text: str) -> int | None:
    """'12,000' -> 12000; '' -> None (no cap); anything else: ValueError."""
    digits = text.strip().replace(",", "").replace("_", "")
    if not digits:
        return None
    if not digits.isascii() or not digits.isdigit() or len(digits) > 13:
        raise ValueError(text)
    tokens = int(digits)
    if tokens > accounts.MAX_TOKENS_PER_DAY:
        raise ValueError(text)
    return tokens


@router.get(PREFIX + "/caps", include_in_schema=False)
def caps(
    session: SignedIn, svc: Svc, done: Annotated[str | None, Query(max_length=16)] = None
) -> Response:
    return caps_page(session, svc, notice=NOTICES.get(done or ""))


@router.post(PREFIX + "/caps/daily", include_in_schema=False)
def set_daily(form: Form, session: SignedIn, svc: Svc) -> Response:
    try:
        tokens = parse_tokens(form.get("tokens_per_day", ""))
    except ValueError:
        return caps_page(session, svc, status=400, error=BAD_TOKENS)
    accounts.set_own_cap(svc.db, svc.redis, account_id=account_of(session), tokens_per_day=tokens)
    return redirect(f"{PREFIX}/caps?done=daily")


@router.post(PREFIX + "/caps/customers", include_in_schema=False)
def set_customer(form: Form, session: SignedIn, svc: Svc) -> Response:
    tag = form.get("customer_tag", "").strip()
    if not 0 < len(tag) <= TAG_MAX:
        error = f"Name the customer as your requests do (X-Customer-Id): 1 to {TAG_MAX} characters."
        return caps_page(session, svc, status=400, error=error)
    try:
        tokens = parse_tokens(form.get("tokens_per_day", ""))
    except ValueError:
        return caps_page(session, svc, status=400, error=BAD_TOKENS)
    try:
        accounts.set_customer_cap(svc.db, svc.redis, account_id=account_of(session),
                                  customer_tag=tag, tokens_per_day=tokens)  # fmt: skip
    except accounts.AccountError as exc:  # too many tags: in the customer's words
        return caps_page(session, svc, status=400, error=f"Not saved: {exc}.")
    return redirect(f"{PREFIX}/caps?done=customer")


@router.post(PREFIX + "/caps/keys", include_in_schema=False)
def set_key(form: Form, session: SignedIn, svc: Svc) -> Response:
    try:
        tokens = parse_tokens(form.get("tokens_per_day", ""))
    except ValueError:
        return caps_page(session, svc, status=400, error=BAD_TOKENS)
    text = form.get("key_id", "")
    key_id = int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else 0
    try:
        accounts.set_key_cap(svc.db, svc.redis, key_id=key_id, account_id=account_of(session),
                             tokens_per_day=tokens)  # fmt: skip
    except accounts.AccountError:  # another account's key, or none: the same answer
        raise NotFound("There is no such key in this account.") from None
    return redirect(f"{PREFIX}/caps?done=key")
