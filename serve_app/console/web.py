"""What every console route shares: templates, the signed-in visitor, forms with their CSRF
check, and errors as pages in words.

`ConsoleRoute` is the route class of the console's routers, and `error_page` the console's one
mapping of errors to pages: whatever a route (or one of its dependencies) raises becomes an
HTML page in words, never a stack trace and never the API's JSON error shape. A
`kernel.errors.DarkGpuError` shows its message with its status; `LoginRequired` becomes a
redirect to the sign-in page. The mapping sits in the route class, not in an app-level
exception handler, because the console shares its FastAPI app with the API, whose handlers
(`serve_app.errors`) answer the same exceptions in JSON; the route class sees its routes'
exceptions first. Every console response carries `Cache-Control: no-store` (pages hold
account data and, once, new keys) and a Content Security Policy that allows only the
console's own files.

Cookies: `dgpu_session` (a signed-in session) and `dgpu_csrf` (an anonymous visitor's CSRF
nonce, `sessions`) are always `Secure`, `HttpOnly`, `SameSite=Lax` and scoped to
`/console`. Browsers keep `Secure` cookies from https sites and from http://127.0.0.1 and
http://localhost (secure contexts), so the local platform works over plain http; on any other
plain-http address the browser drops it, and the sign-in page says to use https. Lax (not
Strict) so that the top-level redirect back from Stripe Checkout arrives signed in; forms are
protected by their CSRF tokens (and the Origin check), not by SameSite.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlsplit

import stripe
from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.exceptions import HTTPException

from kernel.errors import (
    AuthError,
    DarkGpuError,
    Forbidden,
    InternalError,
    InvalidRequest,
    PayloadTooLarge,
)
from serve_app.console import format
from serve_app.console.sessions import (
    COOKIE,
    CSRF_COOKIE,
    SIGNED_IN_TTL_S,
    Session,
    SessionStore,
)
from serve_app.errors import payment_provider_down
from serve_app.services import Services, services

logger = logging.getLogger("darkgpu.console")
HERE = Path(__file__).resolve().parent
PREFIX = "/console"
MAX_FORM_BYTES = 64 * 1024
LOOPBACK = {"127.0.0.1", "localhost", "[::1]"}
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def template_env(folder: Path) -> Environment:
    """Jinja templates as the console and the public site render them: autoescaped, strict
    about undefined names, with the console's number and money filters."""
    env = Environment(
        loader=FileSystemLoader(folder),
        autoescape=select_autoescape(default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(format.FILTERS)
    return env


templates = template_env(HERE / "templates")


class LoginRequired(AuthError):
    """A page for signed-in visitors only: the console answers with the sign-in page."""

    def __init__(self) -> None:
        super().__init__("Sign in to see this page.")


class NotAForm(InvalidRequest):
    """415: the console takes only its own url-encoded forms."""

    status = 415


def page(
    name: str,
    session: Session | None,
    status: int = 200,
    cookie: str | None = None,
    **context: Any,
) -> HTMLResponse:
    """Render a template; `cookie`: a new session token to set."""
    html = templates.get_template(name).render(session=session, prefix=PREFIX, **context)
    response = HTMLResponse(html, status_code=status)
    if cookie is not None:
        set_cookie(response, cookie)
    return response


def redirect(path: str, cookie: str | None = None) -> RedirectResponse:
    response = RedirectResponse(path, status_code=303)
    if cookie is not None:
        set_cookie(response, cookie)
    return response


def set_cookie(response: Response, token: str, name: str = COOKIE) -> None:
    response.set_cookie(
        name, token, max_age=SIGNED_IN_TTL_S, path=PREFIX, secure=True, httponly=True,
        samesite="lax",
    )  # fmt: skip


def clear_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path=PREFIX, secure=True, httponly=True, samesite="lax")


def _error_page(status: int, message: str) -> Response:
    try:
        return page("error.html", None, status=status, message=message)
    except Exception:  # the templates themselves failed: still words, still no trace
        logger.exception("the console's error page failed")
        return PlainTextResponse(message, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "That request had a value the console cannot use."
    first = errors[0]
    name = str(first.get("loc", ("", "value"))[-1])
    return f"The value of “{name}” is not valid: {first.get('msg', 'invalid')}."


def error_page(request: Request, exc: Exception) -> Response:
    """What the visitor sees for `exc`: the console's one mapping of errors to pages."""
    if isinstance(exc, LoginRequired):
        return redirect(f"{PREFIX}/login")
    if isinstance(exc, stripe.StripeError):
        exc = payment_provider_down(exc)
    if isinstance(exc, DarkGpuError) and not isinstance(exc, InternalError):
        return _error_page(exc.status, exc.message)
    if isinstance(exc, RequestValidationError):
        return _error_page(400, _validation_message(exc))
    if isinstance(exc, HTTPException):
        return _error_page(exc.status_code, str(exc.detail))
    # unexpected, or a broken invariant (InternalError): its words stay in the log
    logger.error("console error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_page(500, "Something went wrong on our side. Please try again in a moment.")


class ConsoleRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                response = await handler(request)
            except Exception as exc:
                response = error_page(request, exc)
            for name, value in HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return run


# --- dependencies --------------------------------------------------------------------------

Svc = Annotated[Services, Depends(services)]


def store(svc: Svc) -> SessionStore:
    return SessionStore(svc.state, accounts=svc.redis)


Store = Annotated[SessionStore, Depends(store)]


def visitor(request: Request, sessions: Store) -> Session | None:
    """The signed-in session of the request's cookie, else the anonymous visitor of its CSRF
    cookie (nothing stored); None without either."""
    found = sessions.find(request.cookies.get(COOKIE))
    if found is None and request.cookies.get(CSRF_COOKIE):
        _, found = sessions.anonymous(request.cookies[CSRF_COOKIE])
    return found


Visitor = Annotated[Session | None, Depends(visitor)]


def signed_in(session: Visitor) -> Session:
    if session is None or not session.signed_in:
        raise LoginRequired()
    return session


SignedIn = Annotated[Session, Depends(signed_in)]


def account_of(session: Session) -> int:
    assert session.account_id is not None
    return session.account_id


async def form_fields(request: Request) -> dict[str, str]:
    """The fields of a posted form (`application/x-www-form-urlencoded`, what every console
    form sends)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise NotAForm("The console accepts only its own forms.")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise PayloadTooLarge("That form was too large.")
    return dict(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))


def same_origin(request: Request) -> bool:
    """A browser names the page that posted a form in `Origin`; it must be this host."""
    origin = request.headers.get("origin")
    if origin is None:  # not a browser that sends it: the CSRF token alone decides
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


def checked_form(
    request: Request, session: Visitor, fields: Annotated[dict[str, str], Depends(form_fields)]
) -> dict[str, str]:
    """A posted form whose CSRF token is the session's, from this site; else a 403 page."""
    if session is None:
        raise Forbidden("Your session expired. Reload the page and submit the form again.")
    if not same_origin(request) or not session.csrf_ok(fields.get("csrf_token")):
        raise Forbidden(
            "This form could not be verified (its security token is missing or stale). "
            "Reload the page and try again."
        )
    return fields


Form = Annotated[dict[str, str], Depends(checked_form)]


def plain_http_elsewhere(request: Request) -> bool:
    """True when a browser would drop the Secure session cookie: plain http, not loopback."""
    if request.headers.get("x-forwarded-proto", "").lower() == "https":
        return False
    host = request.headers.get("host", "").rsplit(":", 1)[0] if request.headers.get("host") else ""
    return request.url.scheme == "http" and host not in LOOPBACK
