"""The consumer's pages: overview, API keys, usage, billing and the model catalog.

    GET  /console/overview                credits, today's tokens against the cap, limits
    GET  /console/keys, POST              the account's keys with their usage and spend
                                          (30 days); a new key (optional expiry) shown once
    POST /console/keys/{id}/revoke
    POST /console/keys/{id}/rename
    GET  /console/usage                   charts by day, model and customer tag; the ledger
    GET  /console/usage.csv               the ledger rows of the chosen range and filters
    GET  /console/billing                 bundles, purchase history
    GET  /console/billing/receipts/{id}   a purchase's printable receipt
    POST /console/billing/checkout        → Stripe Checkout
    GET  /console/models                  the catalog, prices, min VRAM, available now

Every page is the signed-in account's own: the account id comes from the session, never
from the request. The numbers come from `billing` (`credits_summary` and `usage_report` are
what `/v1/credits` and `/v1/usage` answer).
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from billing import accounts, checkout, key_usage, receipts, reports
from billing.reports import UsageFilter, UsageRow
from billing.stripe_client import PaymentsNotConfigured
from kernel.errors import Forbidden, InvalidRequest, NotFound, Unavailable
from serve_app.console import charts
from serve_app.console.format import count, usd
from serve_app.console.sessions import COOKIE
from serve_app.console.web import (
    PREFIX,
    ConsoleRoute,
    Form,
    LoginRequired,
    SignedIn,
    Store,
    Svc,
    Visitor,
    account_of,
    page,
    redirect,
)

router = APIRouter(route_class=ConsoleRoute)
MAX_DAYS = 366
DEFAULT_DAYS = 30
PAGE_SIZE = 50
KEY_NAME_MAX = accounts.KEY_NAME_MAX


def api_base(request: Request) -> str:
    scheme = request.headers.get("x-forwarded-proto") or request.url.scheme
    return f"{scheme}://{request.headers.get('host', request.url.netloc)}/v1"


@router.get(PREFIX + "/overview", include_in_schema=False)
def overview(request: Request, session: SignedIn, svc: Svc) -> Response:
    account_id = account_of(session)
    summary = reports.credits_summary(svc.db, svc.redis, svc.plans, account_id)
    keys = [k for k in accounts.list_keys(svc.db, account_id) if k.revoked_at is None]
    return page(
        "overview.html",
        session,
        active="overview",
        summary=summary,
        balance=summary.balance_nusd if summary.available_nusd is None else summary.available_nusd,
        rpm=accounts.requests_per_minute(svc.db, svc.plans, account_id),
        active_keys=len(keys),
        api_base=api_base(request),
    )


# --- keys ----------------------------------------------------------------------------------


EXPIRY_DAYS = (7, 30, 90, 365)


def _keys_page(session: SignedIn, svc: Svc, status: int = 200, **context: Any) -> Response:
    context.setdefault("new_key", None)
    context.setdefault("error", None)
    context.setdefault("notice", None)
    last = datetime.now(UTC)
    first = last - timedelta(days=DEFAULT_DAYS)
    keys = key_usage.keys_with_usage(svc.db, account_id=account_of(session), start=first,
                                     end=last)  # fmt: skip
    return page("keys.html", session, status=status, active="keys", keys=keys,
                expiry_days=EXPIRY_DAYS, usage_days=DEFAULT_DAYS, now=last, **context)  # fmt: skip


KEY_NOTICES = {
    "revoked": "Key {} is revoked: requests with it now get 401.",
    "renamed": "Key {} is renamed.",
}


@router.get(PREFIX + "/keys", include_in_schema=False)
def keys_page(request: Request, session: SignedIn, svc: Svc, sessions: Store) -> Response:
    notice = None
    for what, words in KEY_NOTICES.items():
        if request.query_params.get(what):
            notice = words.format(request.query_params[what])
    new_key = None
    if "created" in request.query_params:  # right after "Create key": the key, once
        secret = sessions.reveal(request.cookies.get(COOKIE))
        if secret is not None:
            new_key = {"key": secret, "name": request.query_params.get("created", "")}
    return _keys_page(session, svc, notice=notice, new_key=new_key)


def _expiry(form: dict[str, str]) -> datetime | None:
    chosen = form.get("expires_in_days", "")
    if chosen in ("", "never"):
        return None
    if not chosen.isdigit() or int(chosen) not in EXPIRY_DAYS:
        raise InvalidRequest("Choose when the key expires from the list.")
    return datetime.now(UTC) + timedelta(days=int(chosen))


@router.post(PREFIX + "/keys", include_in_schema=False)
def create_key(
    request: Request, form: Form, session: SignedIn, svc: Svc, sessions: Store
) -> Response:
    name = form.get("name", "").strip()
    if not name or len(name) > KEY_NAME_MAX:
        return _bad_key_name(session, svc)
    try:
        key = accounts.create_key(
            svc.db, svc.redis, account_id=account_of(session), name=name, expires_at=_expiry(form)
        )
    except accounts.AccountError:  # in the visitor's words, not the operator's
        raise Forbidden("This account cannot create keys (it is not active).") from None
    assert key.key is not None
    # post/redirect/get: a reload shows the list, and never makes another key
    sessions.stash(request.cookies.get(COOKIE, ""), key.key)
    return redirect(f"{PREFIX}/keys?{urlencode({'created': name})}")


def _bad_key_name(session: SignedIn, svc: Svc) -> Response:
    error = f"Give the key a name of 1 to {KEY_NAME_MAX} characters."
    return _keys_page(session, svc, status=400, error=error)


@router.post(PREFIX + "/keys/{key_id}/revoke", include_in_schema=False)
def revoke_key(key_id: int, form: Form, session: SignedIn, svc: Svc) -> Response:
    try:
        info = accounts.revoke_key(svc.db, svc.redis, key_id=key_id, account_id=account_of(session))
    except accounts.AccountError:  # whichever the reason, the visitor's key is not there
        raise NotFound("There is no such key in this account.") from None
    return redirect(f"{PREFIX}/keys?{urlencode({'revoked': info.prefix + '…'})}")


@router.post(PREFIX + "/keys/{key_id}/rename", include_in_schema=False)
def rename_key(key_id: int, form: Form, session: SignedIn, svc: Svc) -> Response:
    name = form.get("name", "").strip()
    if not name or len(name) > KEY_NAME_MAX:
        return _bad_key_name(session, svc)
    try:
        info = accounts.rename_key(svc.db, key_id=key_id, account_id=account_of(session),
                                   name=name)  # fmt: skip
    except accounts.AccountError:
        raise NotFound("There is no such key in this account.") from None
    return redirect(f"{PREFIX}/keys?{urlencode({'renamed': info.prefix + '…'})}")


# --- usage ---------------------------------------------------------------------------------


def _day(text: str | None, default: date, what: str) -> date:
    if not text:
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"The {what} date must look like 2026-11-25.") from None


def chosen_days(start: str | None, end: str | None) -> tuple[date, date]:
    """The UTC days [first, last] a usage page shows (default: the last 30 days)."""
    last = _day(end, datetime.now(UTC).date(), "end")
    first = _day(start, last - timedelta(days=DEFAULT_DAYS - 1), "start")
    if first > last:
        raise InvalidRequest("The start date is after the end date.")
    if (last - first).days >= MAX_DAYS:
        raise InvalidRequest(f"Choose at most {MAX_DAYS} days at a time.")
    return first, last


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


def _zulu(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


Text = Annotated[str | None, Query(max_length=256)]


@dataclass(frozen=True)
class ChosenUsage:
    first: date
    last: date
    filter: UsageFilter


def chosen_usage(
    session: SignedIn,
    start: Text = None,
    end: Text = None,
    model: Text = None,
    customer: Text = None,
) -> ChosenUsage:
    """The signed-in account's usage over the query's days, model and customer tag."""
    first, last = chosen_days(start, end)
    chosen = UsageFilter(
        day_start(first),
        day_start(last + timedelta(days=1)),
        account_id=account_of(session),
        model=model or None,
        customer_tag=customer or None,
    )
    return ChosenUsage(first, last, chosen)


Chosen = Annotated[ChosenUsage, Depends(chosen_usage)]


def _every_day(first: date, last: date, rows: list[UsageRow]) -> list[UsageRow]:
    found = {row.group: row for row in rows}
    days = ((first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1))
    return [found.get(day) or UsageRow(day, 0, 0, 0, 0) for day in days]


def _charts(title: str, rows: list[UsageRow], draw: Callable[..., Any]) -> dict[str, Any]:
    names = [row.group or "(no tag)" for row in rows]
    return {
        "tokens": draw(
            f"Tokens by {title}",
            [charts.Bar(n, r.total_tokens) for n, r in zip(names, rows, strict=True)],
            lambda v: f"{count(v)} tokens",
        ),
        "spend": draw(
            f"Spend by {title}",
            [charts.Bar(n, r.cost_nusd) for n, r in zip(names, rows, strict=True)],
            usd,
        ),
        "rows": rows,
    }


@router.get(PREFIX + "/usage", include_in_schema=False)
def usage_page(
    session: SignedIn,
    svc: Svc,
    usage: Chosen,
    page_number: Annotated[int, Query(alias="page", ge=1, le=100_000)] = 1,
) -> Response:
    first, last, chosen = usage.first, usage.last, usage.filter

    def report(group_by: reports.GroupBy) -> list[UsageRow]:
        return reports.usage_report(
            svc.db, start=chosen.start, end=chosen.end, group_by=group_by,
            account_id=chosen.account_id,
        )  # fmt: skip

    by_day = _every_day(first, last, report("day"))
    by_model, by_customer = report("model"), report("customer")
    events, total = reports.usage_events(
        svc.db, chosen, offset=(page_number - 1) * PAGE_SIZE, limit=PAGE_SIZE
    )
    query = {"start": first.isoformat(), "end": last.isoformat(),
             "model": chosen.model or "", "customer": chosen.customer_tag or ""}  # fmt: skip
    return page(
        "usage.html",
        session,
        active="usage",
        query=query,
        chosen=chosen,
        day=_charts("day", by_day, charts.columns),
        model=_charts("model", by_model, charts.rows),
        customer=_charts("customer tag", by_customer, charts.rows),
        totals=UsageRow(
            "total",
            sum(r.requests for r in by_day),
            sum(r.prompt_tokens for r in by_day),
            sum(r.completion_tokens for r in by_day),
            sum(r.cost_nusd for r in by_day),
        ),
        models=[r.group for r in by_model if r.group],
        customers=[r.group for r in by_customer if r.group],
        events=events,
        total_events=total,
        page_number=page_number,
        pages=max(1, -(-total // PAGE_SIZE)),
        api_query=f"start={_zulu(chosen.start)}&end={_zulu(chosen.end)}",
    )


@router.get(PREFIX + "/usage.csv", include_in_schema=False)
def usage_csv(svc: Svc, usage: Chosen) -> Response:
    first, last, chosen = usage.first, usage.last, usage.filter
    out = io.StringIO()
    reports.export_usage_csv(
        svc.db, out, start=chosen.start, end=chosen.end, account_id=chosen.account_id,
        model=chosen.model, customer_tag=chosen.customer_tag,
    )  # fmt: skip
    name = f"darkgpu-usage-{first.isoformat()}-{last.isoformat()}.csv"
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


# --- billing -------------------------------------------------------------------------------


CHECKOUT_OUTCOMES = {
    "success": "Thank you: the credits are added as soon as Stripe confirms the payment.",
    "cancelled": "The checkout was cancelled; nothing was charged.",
}


def returned_from_stripe(title: str, notice: str) -> Response:
    """Where Stripe sends a visitor back (`Settings.checkout_success_url` and the rest) to a
    browser that is no longer signed in: what happened, in words, and the way to sign in;
    a redirect to the sign-in page would lose it."""
    return page("returned.html", None, title=title, notice=notice)


@router.get(PREFIX + "/billing", include_in_schema=False)
def billing_page(request: Request, visitor: Visitor, svc: Svc) -> Response:
    notice = CHECKOUT_OUTCOMES.get(request.query_params.get("checkout") or "")
    if visitor is None or not visitor.signed_in:
        if notice is None:
            raise LoginRequired()
        return returned_from_stripe("Billing", notice)
    session = visitor
    return page(
        "billing.html",
        session,
        active="billing",
        bundles=sorted(svc.plans.bundles.items(), key=lambda item: item[1].price_nusd),
        purchases=checkout.purchases(svc.db, account_of(session)),
        receipt_number=receipts.number_of,
        payments_on=svc.stripe is not None,
        notice=notice,
    )


@router.get(PREFIX + "/billing/receipts/{payment_id}", include_in_schema=False)
def receipt_page(
    payment_id: Annotated[int, Path(ge=1, le=2**62)], session: SignedIn, svc: Svc
) -> Response:
    found = receipts.receipt(svc.db, account_id=account_of(session), payment_id=payment_id)
    if found is None:  # whoever's it is, this account has no such purchase
        raise NotFound("There is no such receipt in this account.")
    return page("receipt.html", session, active="billing", receipt=found)


@router.post(PREFIX + "/billing/checkout", include_in_schema=False)
def start_checkout(form: Form, session: SignedIn, svc: Svc) -> Response:
    if svc.stripe is None:
        raise PaymentsNotConfigured("Payments are not available right now.")
    result = checkout.create_checkout(
        svc.db, svc.stripe, svc.plans, svc.settings,
        account_id=account_of(session), bundle=form.get("bundle", ""),
        capped_budget=form.get("daily_cap") == "on",
    )  # fmt: skip
    return redirect(result.url)


# --- models --------------------------------------------------------------------------------

ModelCards = Callable[[], Awaitable[list[dict[str, Any]]]]


@router.get(PREFIX + "/models", include_in_schema=False)
async def models_page(request: Request, session: SignedIn) -> Response:
    cards: ModelCards | None = getattr(request.app.state, "model_cards", None)
    if cards is None:
        raise Unavailable("The model catalog is not available right now.")
    models = await cards()
    return await run_in_threadpool(page, "models.html", session, active="models", models=models)
