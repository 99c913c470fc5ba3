"""Signing up, in and out, and the console's own static files.

    GET  /console                  → the overview, or the sign-in page
    GET  /console/signup, POST     a free account ($10 of credits) and its first key, shown once
    GET  /console/login,  POST     email and password (argon2id, `billing.signup.verify_password`)
    POST /console/logout           ends the session
    GET  /console/static/{name}    console.css, console.js

Sign-up and sign-in attempts are throttled per client IP and network before any password is
hashed (`serve_app.throttle`: the form again, 429, saying when to try again); failed
sign-ins lock an email only from the network they came from (`sessions`).

The sign-in and sign-up forms carry an anonymous visitor's CSRF token (the HMAC of its
`dgpu_csrf` cookie's nonce: nothing stored in Redis); signing in or up starts a signed-in
session, the first thing the console stores.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from billing import accounts, email_verification, signup
from core.schema import AccountStatus
from kernel.errors import NotFound, RateLimited
from serve_app.console.sessions import CSRF_COOKIE, Session
from serve_app.console.web import (
    HERE,
    PREFIX,
    ConsoleRoute,
    Form,
    Store,
    Svc,
    Visitor,
    clear_cookie,
    page,
    plain_http_elsewhere,
    redirect,
    set_cookie,
)
from serve_app.throttle import Throttle, network_of

router = APIRouter(route_class=ConsoleRoute)
STATIC = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}
WRONG_LOGIN = "That email and password do not match an account."


@router.get(PREFIX, include_in_schema=False)
def home(session: Visitor) -> Response:
    return redirect(f"{PREFIX}/overview" if session and session.signed_in else f"{PREFIX}/login")


@router.get(PREFIX + "/static/{name}", include_in_schema=False)
def static(name: str) -> Response:
    if name not in STATIC:
        raise NotFound("There is no such page.")
    body = (HERE / "static" / name).read_bytes()
    return Response(body, media_type=STATIC[name], headers={"Cache-Control": "max-age=300"})


def _anonymous_form(
    template: str, request: Request, session: Session | None, sessions: Store, **context: object
) -> Response:
    """A sign-in or sign-up page, for an anonymous visitor (a new one gets its CSRF cookie;
    nothing is stored)."""
    if session is not None and session.signed_in:
        return redirect(f"{PREFIX}/overview")
    nonce = None
    if session is None:
        nonce, session = sessions.anonymous()
    context.setdefault("error", None)
    context.setdefault("notice", None)
    context.setdefault("email", "")
    response = page(
        template,
        session,
        status=400 if context["error"] else 200,
        cookie=None,
        insecure=plain_http_elsewhere(request),
        **context,
    )
    if nonce is not None:
        set_cookie(response, nonce, CSRF_COOKIE)
    return response


def _throttled(
    template: str,
    request: Request,
    session: Session,
    sessions: Store,
    exc: RateLimited,
    **context: object,
) -> Response:
    """The form again, saying in words when to try again: 429 with `Retry-After`."""
    response = _anonymous_form(template, request, session, sessions, error=exc.message,
                               **context)  # fmt: skip
    response.status_code = exc.status
    response.headers.update(exc.headers)
    return response


@router.get(PREFIX + "/login", include_in_schema=False)
def login_page(request: Request, session: Visitor, sessions: Store) -> Response:
    notice = None
    if request.query_params.get("signed_out"):
        notice = "You are signed out."
    elif request.query_params.get("reset"):
        notice = "Your password is changed and every session signed out: sign in with it."
    elif request.query_params.get("deleted"):
        notice = "Your account is deleted. Thank you for using DarkGPU."
    return _anonymous_form("login.html", request, session, sessions, notice=notice)


@router.post(PREFIX + "/login", include_in_schema=False)
def login(request: Request, form: Form, session: Visitor, sessions: Store, svc: Svc) -> Response:
    assert session is not None  # checked_form refuses a form without one
    email = form.get("email", "").strip().lower()
    password = form.get("password", "")
    throttle = Throttle(svc.state, svc.settings)
    ip = throttle.client(request)
    network = network_of(ip)
    if sessions.login_blocked(email, network):
        return _anonymous_form(
            "login.html", request, session, sessions, email=email,
            error="Too many failed sign-ins for this email. Try again in 15 minutes.",
        )  # fmt: skip
    account_id = None
    if email and password:
        try:
            throttle.check(throttle.signin, ip)  # before argon2
        except RateLimited as exc:
            return _throttled("login.html", request, session, sessions, exc, email=email)
        account_id = signup.verify_password(svc.db, email, password)
    if account_id is None:
        if email and password:  # a guess, counted by the throttle: nothing else is stored
            sessions.login_failed(email, network)
        return _anonymous_form("login.html", request, session, sessions, email=email,
                               error=WRONG_LOGIN)  # fmt: skip
    account = accounts.get_account(svc.db, account_id)
    if account.status != AccountStatus.active.value:
        return _anonymous_form("login.html", request, session, sessions, email=email,
                               error="This account is suspended. Contact support.")  # fmt: skip
    sessions.login_succeeded(email, network)
    sessions.end(session)
    token, _ = sessions.start(account_id, account.email)
    return redirect(f"{PREFIX}/overview", cookie=token)


@router.get(PREFIX + "/signup", include_in_schema=False)
def signup_page(request: Request, session: Visitor, sessions: Store) -> Response:
    return _anonymous_form("signup.html", request, session, sessions)


@router.post(PREFIX + "/signup", include_in_schema=False)
def signup_submit(
    request: Request, form: Form, session: Visitor, sessions: Store, svc: Svc
) -> Response:
    assert session is not None
    email = form.get("email", "")
    throttle = Throttle(svc.state, svc.settings)
    ip = throttle.client(request)
    try:
        result = signup.signup(
            svc.db, svc.redis, svc.plans, email=email, password=form.get("password", ""),
            before_hash=lambda: throttle.check(throttle.signup, ip),
            mailer=email_verification.mailer_for(svc.settings, svc.redis),
        )  # fmt: skip
    except RateLimited as exc:
        return _throttled("signup.html", request, session, sessions, exc, email=email.strip())
    except signup.SignupError as exc:  # EmailTaken too: the message says which
        return _anonymous_form("signup.html", request, session, sessions, email=email.strip(),
                               error=str(exc))  # fmt: skip
    sessions.end(session)
    token, new = sessions.start(result.account.id, result.account.email)
    return page(
        "welcome.html",
        new,
        cookie=token,
        account=result.account,
        key=result.key,
        active="overview",
    )


@router.post(PREFIX + "/logout", include_in_schema=False)
def logout(form: Form, session: Visitor, sessions: Store) -> Response:
    if session is not None:
        sessions.end(session)
    response = redirect(f"{PREFIX}/login?signed_out=1")
    clear_cookie(response)
    return response
