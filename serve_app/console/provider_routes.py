"""The provider's pages, for accounts that lend GPUs.

    GET  /console/provider               nodes (status, GPU, trust tier, attestation), earnings
                                         by day and model, payouts, the install commands
    POST /console/provider/nodes         a new provider: its `dgpp-` token is shown once
    POST /console/provider/onboarding    → Stripe Connect onboarding

Only the account's own providers are listed (`cluster.registry.list_providers`); earnings and
payouts come from `billing.earnings` and `billing.payouts`, as `/v1/providers/me/earnings`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

import stripe
from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session

from billing import connect, earnings, payouts
from cluster import registry
from serve_app.console.account_routes import Text, chosen_days
from serve_app.console.sessions import COOKIE
from serve_app.console.web import (
    PREFIX,
    ConsoleError,
    ConsoleRoute,
    Form,
    SignedIn,
    Store,
    Svc,
    account_of,
    page,
    redirect,
)

router = APIRouter(route_class=ConsoleRoute)
NAME_MAX = 100
INSTALL = "curl -fsSL https://darkgpu.ai/install.sh | bash"
SIGN_IN_AND_SERVE = "darkgpu auth && darkgpu serve"


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
        payout_account=connect.payout_account(svc.db, account_id),
        payments_on=svc.stripe is not None,
        query={"start": first.isoformat(), "end": last.isoformat()},
        install=INSTALL,
        sign_in_and_serve=SIGN_IN_AND_SERVE,
        now=datetime.now(UTC),
        **context,
    )


@router.get(PREFIX + "/provider", include_in_schema=False)
def provider_page(
    request: Request,
    session: SignedIn,
    svc: Svc,
    sessions: Store,
    start: Text = None,
    end: Text = None,
    onboarding: Annotated[str | None, Query(max_length=16)] = None,
    created: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    notice = {
        "done": "Back from Stripe: payouts start once Stripe confirms the account.",
        "refresh": "The onboarding link expired; start again below.",
    }.get(onboarding or "")
    new_token = None
    if created:  # right after "Add a GPU": its token, once
        secret = sessions.reveal(request.cookies.get(COOKIE))
        mine = {n.id: n for n in registry.list_providers(svc.db, account_id=account_of(session))}
        if secret is not None and created in mine:
            new_token = {"token": secret, "provider": mine[created]}
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
    try:
        new = registry.create_provider(svc.db, account_id=account_of(session), name=name)
    except registry.RegistryError as exc:
        raise ConsoleError(str(exc)) from None
    # post/redirect/get: a reload shows the page, and never adds another GPU
    sessions.stash(request.cookies.get(COOKIE, ""), new.token)
    return redirect(f"{PREFIX}/provider?{urlencode({'created': new.provider.id})}")


@router.post(PREFIX + "/provider/onboarding", include_in_schema=False)
def onboarding(form: Form, session: SignedIn, svc: Svc) -> Response:
    if svc.stripe is None:
        raise ConsoleError("Payouts are not available right now.", 503)
    try:
        link = connect.onboarding_link(
            svc.db, svc.stripe, svc.settings, account_id=account_of(session)
        )
    except connect.NoProviders:
        raise ConsoleError(
            "Add a GPU first: payouts are for accounts that lend one.", 404
        ) from None
    except stripe.StripeError:
        raise ConsoleError("The payment provider did not answer; try again shortly.", 503) from None
    return redirect(link.url)
