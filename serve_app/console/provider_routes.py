"""The provider's pages, for accounts that lend GPUs.

    GET  /console/provider               nodes (status, GPU, trust tier, attestation), earnings
                                         by day and model, payouts, the install commands
    POST /console/provider/nodes         a new provider: its `dgpp-` token is shown once
    POST /console/provider/nodes/{id}/token   rotate: old tokens revoked, the new one shown once
    POST /console/provider/nodes/{id}/remove  retire the GPU (final): tokens revoked, no traffic
    POST /console/provider/onboarding    → Stripe Connect onboarding

The page also shows weekly statements (`billing.statements`): per ISO week, what each GPU
served and earned and the week's payout. Another account's provider is 404 to every action
(`cluster.registry.remove_provider`, `rotate_token`).

Only the account's own providers are listed (`cluster.registry.list_providers`); earnings and
payouts come from `billing.earnings` and `billing.payouts`, as `/v1/providers/me/earnings`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Path, Query, Request, Response
from sqlalchemy.orm import Session

from billing import connect, earnings, payouts, statements
from billing.stripe_client import PaymentsNotConfigured
from cluster import market, registry
from serve_app.console.account_routes import Text, chosen_days, returned_from_stripe
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
from serve_app.routes_market import current_market

router = APIRouter(route_class=ConsoleRoute)
NAME_MAX = 100
SIGN_IN_AND_SERVE = "darkgpu auth && darkgpu serve"
ONBOARDING_OUTCOMES = {
    "done": "Back from Stripe: payouts start once Stripe confirms the account.",
    "refresh": "The onboarding link expired; start again below.",
}


def _provider_page(session: SignedIn, svc: Svc, start: str | None = None,
                   end: str | None = None, **context: Any) -> Response:  # fmt: skip
    account_id = account_of(session)
    first, last = chosen_days(start, end)
    nodes = registry.list_providers(svc.db, account_id=account_id)
    ids = [n.id for n in nodes]
    rows = earnings.earnings(svc.db, ids, start=first, end=last + timedelta(days=1))
    with Session(svc.db) as sql:
        payable = earnings.payable_balances(sql, ids)
    context.setdefault("new_token", None)
    context.setdefault("error", None)
    return page(
        "provider.html",
        session,
        active="provider",
        nodes=nodes,
        earnings=rows,
        earned=sum(r.earned_nusd for r in rows),
        payable=payable,
        payable_total=sum(payable.values()),
        payouts=payouts.recent_payouts(svc.db, ids),
        statements=statements.weekly_statements(svc.db, ids, now=datetime.now(UTC)),
        names={n.id: n.name for n in nodes},
        payout_account=connect.payout_account(svc.db, account_id),
        payments_on=svc.stripe is not None,
        query={"start": first.isoformat(), "end": last.isoformat()},
        install=f"curl -fsSL {svc.settings.base_url}/install.sh | bash",
        sign_in_and_serve=SIGN_IN_AND_SERVE,
        now=datetime.now(UTC),
        record=market.reputation(svc.db, ids),
        market=current_market(svc),
        **context,
    )


@router.get(PREFIX + "/provider", include_in_schema=False)
def provider_page(
    request: Request,
    visitor: Visitor,
    svc: Svc,
    sessions: Store,
    start: Text = None,
    end: Text = None,
    onboarding: Annotated[str | None, Query(max_length=16)] = None,
    created: Annotated[str | None, Query(max_length=64)] = None,
    rotated: Annotated[str | None, Query(max_length=64)] = None,
    removed: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    notice = ONBOARDING_OUTCOMES.get(onboarding or "")
    if visitor is None or not visitor.signed_in:
        if notice is None:
            raise LoginRequired()
        return returned_from_stripe("Provider", notice.replace("below", "on the Provider page"))
    session = visitor
    new_token = None
    shown = created or rotated
    mine = {n.id: n for n in registry.list_providers(svc.db, account_id=account_of(session))}
    if shown:  # right after "Add a GPU" or "New token": the token, once
        secret = sessions.reveal(request.cookies.get(COOKIE))
        if secret is not None and shown in mine:
            new_token = {"token": secret, "provider": mine[shown]}
        if rotated in mine:
            notice = (f"Every earlier token of “{mine[rotated].name}” is revoked: its agent "
                      "must sign in again with the new one (darkgpu auth).")  # fmt: skip
    if removed in mine:
        notice = (
            f"“{mine[removed].name}” is removed: its tokens are revoked and it gets no more "
            "requests. Earnings not yet paid out wait for the operator's review."
        )
    return _provider_page(session, svc, start, end, notice=notice, new_token=new_token)


@router.post(PREFIX + "/provider/nodes", include_in_schema=False)
def add_node(
    request: Request, form: Form, session: SignedIn, svc: Svc, sessions: Store
) -> Response:
    name = form.get("name", "").strip()
    if not name or len(name) > NAME_MAX:
        return _provider_page(
            session, svc, notice=None, error=f"Name the GPU in 1 to {NAME_MAX} characters."
        )
    new = registry.create_provider(svc.db, account_id=account_of(session), name=name)
    # post/redirect/get: a reload shows the page, and never adds another GPU
    sessions.stash(request.cookies.get(COOKIE, ""), new.token)
    return redirect(f"{PREFIX}/provider?{urlencode({'created': new.provider.id})}")


@router.post(PREFIX + "/provider/onboarding", include_in_schema=False)
def onboarding(form: Form, session: SignedIn, svc: Svc) -> Response:
    if svc.stripe is None:
        raise PaymentsNotConfigured("Payouts are not available right now.")
    try:
        link = connect.onboarding_link(
            svc.db, svc.stripe, svc.settings, account_id=account_of(session)
        )
    except connect.NoProviders:  # in the visitor's words, not the operator's
        raise connect.NoProviders(
            "Add a GPU first: payouts are for accounts that lend one."
        ) from None
    return redirect(link.url)


ProviderId = Annotated[str, Path(min_length=1, max_length=64)]


@router.post(PREFIX + "/provider/nodes/{provider_id}/token", include_in_schema=False)
def rotate_token(
    provider_id: ProviderId, request: Request, form: Form, session: SignedIn, svc: Svc,
    sessions: Store,
) -> Response:  # fmt: skip
    token = registry.rotate_token(svc.db, account_id=account_of(session), provider_id=provider_id)
    sessions.stash(request.cookies.get(COOKIE, ""), token)
    return redirect(f"{PREFIX}/provider?{urlencode({'rotated': provider_id})}")


@router.post(PREFIX + "/provider/nodes/{provider_id}/remove", include_in_schema=False)
def remove_node(provider_id: ProviderId, form: Form, session: SignedIn, svc: Svc) -> Response:
    registry.remove_provider(svc.db, account_id=account_of(session), provider_id=provider_id)
    return redirect(f"{PREFIX}/provider?{urlencode({'removed': provider_id})}")
