"""Signing up, in and out, and the console's own static files.

    GET  /console                  → the overview, or the sign-in page
    GET  /console/signup, POST     a free account ($10 of credits) and its first key, shown once
    GET  /console/login,  POST     email and password (argon2id, `billing.signup.verify_password`)
    POST /console/logout           ends the session
    GET  /console/static/{name}    console.css, console.js

The sign-in and sign-up forms carry the CSRF token of an anonymous session, made when the
page is shown; signing in or up replaces it with a new, signed-in one.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from billing import accounts, signup
from billing.schema import AccountStatus
from serve_app.console.sessions import Session
from serve_app.console.web import (
    HERE,
    PREFIX,
    ConsoleError,
    ConsoleRoute,
    Form,
    Store,
    Svc,
    Visitor,
    clear_cookie,
    page,
    plain_http_elsewhere,
    redirect,
)

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
        raise ConsoleError("There is no such page.", status=404)
    body = (HERE / "static" / name).read_bytes()
    return Response(body, media_type=STATIC[name], headers={"Cache-Control": "max-age=300"})


def _anonymous_form(
    template: str, request: Request, session: Session | None, sessions: Store, **context: object
) -> Response:
    """A sign-in or sign-up page: with the visitor's session, or a new anonymous one."""
    if session is not None and session.signed_in:
        return redirect(f"{PREFIX}/overview")
    token = None
    if session is None:
        token, session = sessions.start()
    context.setdefault("error", None)
    context.setdefault("notice", None)
    context.setdefault("email", "")
    return page(
        template,
        session,
        status=400 if context["error"] else 200,
        cookie=token,
        insecure=plain_http_elsewhere(request),
        **context,
    )


@router.get(PREFIX + "/login", include_in_schema=False)
def login_page(request: Request, session: Visitor, sessions: Store) -> Response:
    notice = "You are signed out." if request.query_params.get("signed_out") else None
    return _anonymous_form("login.html", request, session, sessions, notice=notice)


@router.post(PREFIX + "/login", include_in_schema=False)
def login(request: Request, form: Form, session: Visitor, sessions: Store, svc: Svc) -> Response:
    assert session is not None  # checked_form refuses a form without one
    email = form.get("email", "").strip().lower()
    password = form.get("password", "")
    if sessions.login_blocked(email):
        return _anonymous_form(
            "login.html", request, session, sessions, email=email,
            error="Too many failed sign-ins for this email. Try again in 15 minutes.",
        )  # fmt: skip
    account_id = signup.verify_password(svc.db, email, password) if email and password else None
    if account_id is None:
        if email:
            sessions.login_failed(email)
        return _anonymous_form("login.html", request, session, sessions, email=email,
                               error=WRONG_LOGIN)  # fmt: skip
    account = accounts.get_account(svc.db, account_id)
    if account.status != AccountStatus.active.value:
        return _anonymous_form("login.html", request, session, sessions, email=email,
                               error="This account is suspended. Contact support.")  # fmt: skip
    sessions.login_succeeded(email)
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
    try:
        result = signup.signup(
            svc.db, svc.redis, svc.plans, email=email, password=form.get("password", "")
        )
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
