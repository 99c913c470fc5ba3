"""The enterprise contact form on the public site.

    GET  /enterprise            the form (and, after sending, "we have your message")
    POST /enterprise            stored for the operator (`billing.enterprise`), then 303

No sign-in and no cookie, like the rest of the site. A post is refused unless it comes from
this site (a browser's `Origin`, when it sends one), and is throttled per client address and
network before anything is stored (`serve_app.throttle`: the form again, 429, saying when to
try again), so nobody fills the operator's table from one machine.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from billing import enterprise
from kernel.errors import Forbidden, RateLimited
from serve_app.console.web import ConsoleRoute, Svc, form_fields, redirect, same_origin
from serve_app.site.routes import page
from serve_app.throttle import Limit, Throttle

router = APIRouter(route_class=ConsoleRoute)
LIMIT = Limit("enterprise", per_ip=5, per_network=20, window_s=3600)
FIELDS = ("name", "email", "company", "message")


def _form(status: int = 200, **context: Any) -> Response:
    context.setdefault("error", None)
    context.setdefault("sent", False)
    context.setdefault("values", dict.fromkeys(FIELDS, ""))
    response = page("enterprise.html", "enterprise", limits=enterprise, **context)
    response.status_code = status
    return response


@router.get("/enterprise", include_in_schema=False)
def enterprise_page(request: Request) -> Response:
    return _form(sent=request.query_params.get("sent") == "1")


@router.post("/enterprise", include_in_schema=False)
def enterprise_submit(
    request: Request, svc: Svc, fields: Annotated[dict[str, str], Depends(form_fields)]
) -> Response:
    if not same_origin(request):
        raise Forbidden("This form can be sent only from this site.")
    values = {name: fields.get(name, "") for name in FIELDS}
    throttle = Throttle(svc.state, svc.settings)
    try:
        throttle.check(LIMIT, throttle.client(request))
        enterprise.submit(svc.db, **values)
    except RateLimited as exc:
        response = _form(status=exc.status, error=exc.message, values=values)
        response.headers.update(exc.headers)
        return response
    except enterprise.InquiryError as exc:
        return _form(status=400, error=exc.message, values=values, bad=exc.param)
    return redirect("/enterprise?sent=1")
