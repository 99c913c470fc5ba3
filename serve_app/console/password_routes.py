"""The account's settings page (password, low-balance email, deletion), and resetting a
forgotten password.

    GET  /console/account                   settings
    POST /console/account/password          current + new password; other sessions end
    POST /console/account/low-balance       the threshold of the low-balance email (USD)
    POST /console/account/delete            password + "DELETE": the account is deleted
    GET  /console/reset, POST               an email: "if it has an account, a link is sent"
    GET  /console/reset/confirm?token=      the mailed link: a form for the new password
    POST /console/reset/confirm             the token is used up; every session ends

Every route that hashes a password asks the sign-in throttle first (`serve_app.throttle`),
as sign-in does: the reset form and its link cannot be used to guess at scale. The reset
request answers in the same words, with the same status, whether the address has an account
or not, and the mail leaves after the answer (a background task), so neither the page nor
its timing says which addresses are registered (`billing.passwords`).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response

from billing import accounts, mail, passwords, signup
from cluster import registry
from kernel.errors import RateLimited
from kernel.money import MAX_BALANCE_NUSD, usd_to_nusd
from serve_app.console.auth_routes import _anonymous_form, _throttled
from serve_app.console.web import (
    PREFIX,
    ConsoleRoute,
    Form,
    SignedIn,
    Store,
    Svc,
    Visitor,
    account_of,
    clear_cookie,
    page,
    redirect,
)
from serve_app.throttle import Throttle

router = APIRouter(route_class=ConsoleRoute)
logger = logging.getLogger("darkgpu.console")
SENT = (
    "If an account uses that address, we have sent it a link to choose a new password. "
    f"The link works once, for {passwords.RESET_TTL_S // 60} minutes."
)
MAX_THRESHOLD_NUSD = min(MAX_BALANCE_NUSD, usd_to_nusd("100000"))
NO_MAIL = "Password reset by email is not set up on this platform: ask its operator."


def settings_page(session: SignedIn, svc: Svc, status: int = 200, **context: Any) -> Response:
    context.setdefault("error", None)
    context.setdefault("notice", None)
    threshold = accounts.low_balance_of(svc.db, account_of(session))
    return page("account.html", session, status=status, active="account",
                threshold=threshold, mail_on=mail.enabled(svc.settings),
                operator=accounts.is_operator(svc.db, account_of(session)), **context)  # fmt: skip


def _throttled_settings(session: SignedIn, svc: Svc, exc: RateLimited) -> Response:
    """The settings page again, 429 with Retry-After: too many password attempts."""
    response = settings_page(session, svc, status=exc.status, error=exc.message)
    response.headers.update(exc.headers)
    return response


NOTICES = {
    "changed": "Your password is changed; your other sessions are signed out.",
    "alert-on": "Saved: we email you once each time your credits fall below it.",
    "alert-off": "The low-balance email is off.",
}
DELETE_WORD = "DELETE"
CONFIRM_DELETE = f"Type {DELETE_WORD} to confirm that the account goes."


@router.get(PREFIX + "/account", include_in_schema=False)
def account_page(
    session: SignedIn, svc: Svc, done: Annotated[str | None, Query(max_length=16)] = None
) -> Response:
    return settings_page(session, svc, notice=NOTICES.get(done or ""))


@router.post(PREFIX + "/account/low-balance", include_in_schema=False)
def set_low_balance(form: Form, session: SignedIn, svc: Svc) -> Response:
    text = form.get("threshold_usd", "").strip().removeprefix("$")
    threshold = None
    if text:
        try:
            threshold = usd_to_nusd(text)
        except ValueError:
            threshold = 0
        if not 0 < threshold <= MAX_THRESHOLD_NUSD:
            return settings_page(session, svc, status=400, error=(
                "Give the threshold in dollars, like 5 or 12.50 (at most $100,000), or leave "
                "it empty to turn the email off."))  # fmt: skip
    accounts.set_low_balance(svc.db, account_id=account_of(session), threshold_nusd=threshold)
    return redirect(f"{PREFIX}/account?done={'alert-on' if threshold else 'alert-off'}")


@router.post(PREFIX + "/account/delete", include_in_schema=False)
def delete_account(request: Request, form: Form, session: SignedIn, svc: Svc) -> Response:
    """The account, deleted as its owner asks: its GPUs removed too; the ledger kept."""
    account_id = account_of(session)
    if form.get("confirm", "").strip() != DELETE_WORD:
        return settings_page(session, svc, status=400, error=CONFIRM_DELETE)
    try:
        Throttle(svc.state, svc.settings).check_signin(request)
    except RateLimited as exc:
        return _throttled_settings(session, svc, exc)
    if not signup.password_matches(svc.db, account_id, form.get("password", "")):
        return settings_page(session, svc, status=400, error="The password is not right.")
    for node in registry.list_providers(svc.db, account_id=account_id):
        registry.remove_provider(svc.db, account_id=account_id, provider_id=node.id)
    passwords.void_reset(svc.redis, account_id)
    accounts.delete_account(svc.db, svc.redis, account_id=account_id, sessions=svc.state)
    response = redirect(f"{PREFIX}/login?deleted=1")
    clear_cookie(response)
    return response


@router.post(PREFIX + "/account/password", include_in_schema=False)
def change_password(request: Request, form: Form, session: SignedIn, svc: Svc) -> Response:
    try:
        Throttle(svc.state, svc.settings).check_signin(request)
        passwords.change_password(
            svc.db, account_id=account_of(session), current=form.get("current_password", ""),
            new=form.get("new_password", ""),
        )  # fmt: skip
    except RateLimited as exc:
        return _throttled_settings(session, svc, exc)
    except (passwords.WrongPassword, signup.SignupError) as exc:
        return settings_page(session, svc, status=400, error=exc.message)
    passwords.void_reset(svc.redis, account_of(session))
    accounts.end_console_sessions(svc.state, account_of(session), keep=session.token_hash)
    return redirect(f"{PREFIX}/account?done=changed")


@router.get(PREFIX + "/reset", include_in_schema=False)
def reset_page(request: Request, session: Visitor, sessions: Store, svc: Svc) -> Response:
    error = None if mail.enabled(svc.settings) else NO_MAIL
    return _anonymous_form("reset.html", request, session, sessions, error=error)


@router.post(PREFIX + "/reset", include_in_schema=False)
def reset_request(
    request: Request,
    form: Form,
    session: Visitor,
    sessions: Store,
    svc: Svc,
    background: BackgroundTasks,
) -> Response:
    assert session is not None  # checked_form refuses a form without one
    email = form.get("email", "").strip()
    if not mail.enabled(svc.settings):
        return _anonymous_form("reset.html", request, session, sessions, email=email,
                               error=NO_MAIL)  # fmt: skip
    try:
        Throttle(svc.state, svc.settings).check_signin(request)
    except RateLimited as exc:
        return _throttled("reset.html", request, session, sessions, exc, email=email)
    pending = passwords.start_reset(svc.db, svc.redis, svc.state, email=email)
    if pending is not None:  # after the answer: its timing says nothing either
        background.add_task(_send, svc, pending)
    return _anonymous_form("reset.html", request, session, sessions, email=email, notice=SENT)


def _send(svc: Svc, pending: passwords.PendingReset) -> None:
    try:
        passwords.send_reset(svc.settings, pending)
    except Exception:  # the visitor was answered; the log says what SMTP refused
        logger.exception("a password-reset mail was not sent")


Token = Annotated[str, Query(max_length=passwords.MAX_TOKEN_LEN)]


@router.get(PREFIX + "/reset/confirm", include_in_schema=False)
def reset_confirm_page(
    request: Request, session: Visitor, sessions: Store, token: Token = ""
) -> Response:
    """The mailed link: a form; the token is used only when the form is posted."""
    return _anonymous_form("reset_confirm.html", request, session, sessions, token=token)


@router.post(PREFIX + "/reset/confirm", include_in_schema=False)
def reset_confirm(
    request: Request, form: Form, session: Visitor, sessions: Store, svc: Svc
) -> Response:
    assert session is not None
    token = form.get("token", "")
    try:
        Throttle(svc.state, svc.settings).check_signin(request)
        account_id = passwords.complete_reset(
            svc.db, svc.redis, token=token, new=form.get("new_password", "")
        )
    except RateLimited as exc:
        return _throttled("reset_confirm.html", request, session, sessions, exc, token=token)
    except (passwords.InvalidResetLink, signup.SignupError) as exc:
        return _anonymous_form("reset_confirm.html", request, session, sessions, token=token,
                               error=exc.message)  # fmt: skip
    accounts.end_console_sessions(svc.state, account_id)
    sessions.end(session)
    return redirect(f"{PREFIX}/login?reset=1")
