"""The operator's pages of the console: providers' review (`cluster.registry.review`, what
`darkgpu admin provider approve|suspend|revoke` calls).

    GET  /console/operator                              every provider, those pending first
    POST /console/operator/providers/{id}/review        {"decision": approve | suspend |
                                                         revoke, "note"}: the decision

Only an account the operator made one of its own (`darkgpu admin account update --operator`)
sees them; to anyone else they are pages that do not exist (404, as an unknown path), so
they say nothing of what is there. Every decision is a posted form with the session's CSRF
token, as every console change.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Path, Query, Response

from billing import accounts
from cluster import registry
from core.schema import ProviderReview
from kernel.errors import InvalidRequest, NotFound
from serve_app.console.sessions import Session
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
DECISIONS = {
    "approve": ProviderReview.approved,
    "suspend": ProviderReview.suspended,
    "revoke": ProviderReview.revoked,
}
NOTE_MAX = 500
PROVIDER_ID = r"^prv_[A-Za-z0-9_-]+$"
ProviderId = Annotated[str, Path(min_length=1, max_length=64, pattern=PROVIDER_ID)]


def operator(session: SignedIn, svc: Svc) -> Session:
    """The signed-in session of one of the operator's accounts; anyone else: no such page."""
    if not accounts.is_operator(svc.db, account_of(session)):
        raise NotFound("There is no such page in the console.")
    return session


Operator = Annotated[Session, Depends(operator)]
REVIEW_ORDER = {"pending": 0, "suspended": 1, "approved": 2, "revoked": 3}


@router.get(PREFIX + "/operator", include_in_schema=False)
def providers_page(
    session: Operator,
    svc: Svc,
    done: Annotated[str | None, Query(max_length=64, pattern=PROVIDER_ID)] = None,
) -> Response:
    providers = sorted(registry.list_providers(svc.db),
                       key=lambda p: (REVIEW_ORDER.get(p.review, 9), p.created_at))  # fmt: skip
    decided = next((p for p in providers if p.id == done), None)  # the notice: never URL text
    notice = f"{decided.name} ({decided.id}) is {decided.review}." if decided else None
    return page("operator.html", session, active="operator", providers=providers,
                notice=notice, error=None, note_max=NOTE_MAX)  # fmt: skip


@router.post(PREFIX + "/operator/providers/{provider_id}/review", include_in_schema=False)
def review(provider_id: ProviderId, form: Form, session: Operator, svc: Svc) -> Response:
    decision = DECISIONS.get(form.get("decision", ""))
    if decision is None:
        raise InvalidRequest("The decision is approve, suspend or revoke.", param="decision")
    note = form.get("note", "").strip()[:NOTE_MAX] or None
    registry.review(svc.db, provider_id, decision, note=note)
    return redirect(f"{PREFIX}/operator?{urlencode({'done': provider_id})}")
