"""The operator's pages of the console (providers' review), on the app `create_app` builds,
real SQLite or PostgreSQL and a real Redis: only an account the operator's CLI marked sees
them (to anyone else they do not exist); each decision is the registry's, with its note;
what a hostile form or URL sends changes nothing."""

from __future__ import annotations

import pytest
from fastapi import FastAPI

from billing import accounts
from cluster import registry
from serve_app.services import Services
from tests.billing import conftest as billing
from tests.serve_app.test_console_app import signed_up
from tests.serve_app.test_console_keys import app, svc

db_url = billing.db_url
__all__ = ["app", "svc"]  # the fixtures: the app on a fresh database and Redis


def account_id(svc: Services, email: str) -> int:
    found = accounts.find_account(svc.db, email)
    assert found is not None
    return found.id


def test_only_an_operators_account_sees_the_operator_pages(app: FastAPI, svc: Services) -> None:
    customer, csrf = signed_up(app, "customer@example.com")
    rig = registry.create_provider(svc.db, account_id=account_id(svc, "customer@example.com"),
                                   name="rig").provider  # fmt: skip
    for response in (
        customer.get("/console/operator"),
        customer.post(
            f"/console/operator/providers/{rig.id}/review",
            data={"csrf_token": csrf, "decision": "approve"},
        ),  # fmt: skip
    ):
        assert response.status_code == 404 and "no such page" in response.text
    assert registry.get_provider(svc.db, rig.id).review == "pending"
    assert "review providers" not in customer.get("/console/account").text
    assert customer.get("/console/operator", follow_redirects=False).status_code == 404


def test_the_operator_approves_suspends_and_revokes_with_a_note(
    app: FastAPI, svc: Services
) -> None:
    signed_up(app, "owner@example.com")
    rig = registry.create_provider(svc.db, account_id=account_id(svc, "owner@example.com"),
                                   name="garage-4090").provider  # fmt: skip
    older = registry.create_provider(svc.db, account_id=account_id(svc, "owner@example.com"),
                                     name="approved-one").provider  # fmt: skip
    registry.review(svc.db, older.id, registry.ProviderReview.approved)
    ops, csrf = signed_up(app, "ops@example.com")
    accounts.set_operator(svc.db, account_id=account_id(svc, "ops@example.com"), operator=True)
    assert "review providers" in ops.get("/console/account").text
    listed = ops.get("/console/operator").text
    assert listed.index(rig.id) < listed.index(older.id)  # pending first

    def decide(decision: str, note: str = ""):
        return ops.post(f"/console/operator/providers/{rig.id}/review",
                        data={"csrf_token": csrf, "decision": decision, "note": note})  # fmt: skip

    done = decide("approve", "checked the owner")
    assert done.status_code == 303 and done.headers["location"].endswith(f"done={rig.id}")
    assert registry.get_provider(svc.db, rig.id).review == "approved"
    assert "garage-4090 (" in ops.get(done.headers["location"]).text
    assert decide("suspend", "x" * 2000).status_code == 303  # a long note is cut, not refused
    assert registry.get_provider(svc.db, rig.id).review == "suspended"
    assert decide("revoke").status_code == 303
    assert registry.get_provider(svc.db, rig.id).review == "revoked"
    again = decide("approve")  # revoking is final
    assert again.status_code == 409 and registry.get_provider(svc.db, rig.id).review == "revoked"


@pytest.mark.parametrize(
    ("path", "fields", "status"),
    [
        ("{id}", {"decision": "pending"}, 400),  # not a decision the operator makes
        ("{id}", {"decision": ""}, 400),
        ("{id}", {"decision": "approve", "csrf_token": "forged"}, 403),
        ("prv_0000000000000000", {"decision": "approve"}, 404),  # no such provider
        ("../../keys", {"decision": "approve"}, 404),
        ("prv_x%0d%0aSet-Cookie:%20a=b", {"decision": "approve"}, 400),  # not an id
    ],
)
def test_hostile_decisions_change_nothing(
    app: FastAPI, svc: Services, path: str, fields: dict[str, str], status: int
) -> None:
    signed_up(app, "someone@example.com")
    rig = registry.create_provider(svc.db, account_id=account_id(svc, "someone@example.com"),
                                   name="rig").provider  # fmt: skip
    ops, csrf = signed_up(app, "ops2@example.com")
    accounts.set_operator(svc.db, account_id=account_id(svc, "ops2@example.com"), operator=True)
    target = path.format(id=rig.id)
    refused = ops.post(f"/console/operator/providers/{target}/review",
                       data={"csrf_token": csrf, **fields})  # fmt: skip
    assert refused.status_code == status, refused.text
    assert registry.get_provider(svc.db, rig.id).review == "pending"
    # the page's notice names a provider from the table, never the URL's text
    shown = ops.get("/console/operator?done=prv_evil<script>").text
    assert "<script>" not in shown and "evil" not in shown
