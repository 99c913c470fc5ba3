"""The provider's console page: rotating a GPU's token (the old ones refused at once, the new
one shown once), removing a GPU (final, its agent refused), weekly statements from the ledger
the meter writes; another account's GPU is 404 to every action. The app `create_app` builds,
real SQLite and a real Redis."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aredis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from billing import accounts
from billing.admission import Admission
from billing.meter import UsageMeter
from billing.payouts import IsoWeek
from billing.plans import load_plans
from cluster import registry
from cluster.registry import ProviderAuthError
from core.schema import Payout, ProviderStatus
from serve_app.console.format import usd
from serve_app.services import Services
from tests.billing.conftest import IN, MODEL, OUT, REDIS_URL, REPO, USD
from tests.serve_app import test_console_app as console
from tests.serve_app.test_console_app import signed_up

svc = console.svc
app = console.app


def add_gpu(c: TestClient, csrf: str, name: str) -> tuple[str, str]:
    """Add a GPU in the console: its id and the token the page shows once."""
    made = c.post("/console/provider/nodes", data={"name": name, "csrf_token": csrf})
    assert made.status_code == 303
    page = c.get(made.headers["location"]).text
    token = re.search(r'id="provider-token"[^>]*>\s*(dgpp-[^<\s]+)', page)[1]
    return made.headers["location"].split("created=")[1], token


def test_rotating_and_removing_a_gpu_only_its_owner_can(app: FastAPI, svc: Services) -> None:
    alice, alice_csrf = signed_up(app, "alice@example.com")
    bob, bob_csrf = signed_up(app, "bob@example.com")
    gpu, first = add_gpu(alice, alice_csrf, "garage-4090")

    for action in ("token", "remove"):  # Bob, signed in, at Alice's GPU
        stolen = bob.post(f"/console/provider/nodes/{gpu}/{action}", data={"csrf_token": bob_csrf})
        assert stolen.status_code == 404 and "No provider" in stolen.text
    forged = alice.post(f"/console/provider/nodes/{gpu}/remove", data={"csrf_token": bob_csrf})
    assert forged.status_code == 403  # another session's CSRF token
    assert registry.authenticate(svc.db, first).id == gpu  # untouched

    rotated = alice.post(f"/console/provider/nodes/{gpu}/token", data={"csrf_token": alice_csrf})
    assert rotated.status_code == 303
    page = alice.get(rotated.headers["location"]).text
    second = re.search(r'id="provider-token"[^>]*>\s*(dgpp-[^<\s]+)', page)[1]
    assert second != first and "Every earlier token" in page
    assert second not in alice.get(rotated.headers["location"]).text  # shown once
    with pytest.raises(ProviderAuthError):
        registry.authenticate(svc.db, first)
    with TestClient(app) as api:
        old = api.post("/v1/providers/auth", headers={"authorization": f"Bearer {first}"})
        assert old.status_code == 401 and old.json()["error"]["type"] == "auth"
        new = api.post("/v1/providers/auth", headers={"authorization": f"Bearer {second}"})
        assert new.status_code == 200, new.text

        removed = alice.post(f"/console/provider/nodes/{gpu}/remove",
                             data={"csrf_token": alice_csrf})  # fmt: skip
        assert removed.status_code == 303
        page = alice.get(removed.headers["location"]).text
        assert "is removed" in page
        row = re.search(rf'<tr data-provider-id="{gpu}">(.*?)</tr>', page, re.S)[1]
        assert "removed" in row and "New token" not in row
        beat = api.post("/v1/providers/heartbeat", json={"status": "online"},
                        headers={"authorization": f"Bearer {second}"})  # fmt: skip
        assert beat.status_code == 401
    assert registry.get_provider(svc.db, gpu).review == "revoked"
    again = alice.post(f"/console/provider/nodes/{gpu}/token", data={"csrf_token": alice_csrf})
    assert again.status_code == 409 and "removed" in again.text


async def _serve(key: str, provider: str, request_id: str, now: float) -> None:
    client = aredis.Redis.from_url(REDIS_URL)
    try:
        admission = Admission(client, load_plans(REPO / "configs" / "plans.toml"), hold_ttl_s=600)
        admitted = await admission.admit(api_key=key, request_id=request_id, model=MODEL,
                                         prompt_tokens=100, max_tokens=200, customer_tag=None,
                                         now=now)  # fmt: skip
        assert type(admitted).__name__ == "Admitted", admitted
        await admission.settle(request_id=request_id, prompt_tokens=100, completion_tokens=200,
                               provider_id=provider, now=now)  # fmt: skip
    finally:
        await client.aclose()


def test_weekly_statements_show_what_each_gpu_earned_and_the_payout(
    app: FastAPI, svc: Services
) -> None:
    owner, csrf = signed_up(app, "lender@example.com")
    gpu, _ = add_gpu(owner, csrf, "rig")
    other = accounts.create_account(svc.db, svc.redis, svc.plans, email="x@example.com").id
    stranger = registry.create_provider(svc.db, account_id=other, name="theirs").provider.id
    buyer = accounts.create_account(svc.db, svc.redis, svc.plans, email="b@example.com").id
    accounts.grant_credits(svc.db, svc.redis, account_id=buyer, amount_nusd=USD)
    key = accounts.create_key(svc.db, svc.redis, account_id=buyer).key
    now = time.time()
    last_week = now - 7 * 86400
    asyncio.run(_serve(key, gpu, "last-week", last_week))  # in time's order: the rate limit
    asyncio.run(_serve(key, gpu, "this-week", now))
    asyncio.run(_serve(key, stranger, "not-mine", now))
    assert UsageMeter(svc.db, svc.redis, consumer="t").drain_once() == 3
    share = (100 * IN + 200 * OUT) * 95 // 100
    previous = IsoWeek.of(datetime.fromtimestamp(last_week, UTC))
    with Session(svc.db) as session, session.begin():
        paid = Payout(provider_id=gpu, week=str(previous), amount_cents=1234,
                      stripe_account_id="acct_x", idempotency_key="k", status="paid")  # fmt: skip
        session.add(paid)

    page = owner.get("/console/provider").text
    current = IsoWeek.of(datetime.fromtimestamp(now, UTC))
    for week, payout in ((current, "—"), (previous, "$12.34 (paid)")):
        total = re.search(
            rf'<tr data-week="{week}" class="statement-total">(.*?)</tr>', page, re.S
        )[1]
        cells = re.findall(r'<td class="num">([^<]*)</td>', total)
        assert cells == ["1", "300", usd(share)], (week, cells)
        assert payout in total
        line = re.search(rf'<tr data-week="{week}" data-provider-id="{gpu}">(.*?)</tr>', page, re.S)
        assert line and "rig" in line[1]
    assert stranger not in page  # another account's GPU and its earnings: nowhere
    assert page.count('class="statement-total"') == 8  # eight weeks, the newest running
    older = str(IsoWeek.of(datetime.fromtimestamp(now, UTC) - timedelta(weeks=3)))
    empty = re.search(rf'<tr data-week="{older}" class="statement-total">(.*?)</tr>', page, re.S)[1]
    assert re.findall(r'<td class="num">([^<]*)</td>', empty) == ["0", "0", "$0.00"]


def test_the_provider_page_shows_demand_and_each_gpus_record(app: FastAPI, svc: Services) -> None:
    """The numbers of `GET /v1/market` and each node's last 7 days (cluster.market)."""
    c, csrf = signed_up(app, "lender@example.com")
    gpu, _ = add_gpu(c, csrf, "rig")
    registry.heartbeat(svc.db, gpu, ProviderStatus.online)
    page = c.get("/console/provider").text
    assert 'id="demand-models"' in page and "darkgpu-tiny" in page
    assert "No GPU earned anything that week." in page
    assert "online 100.0%, 0 requests, 0 strikes" in page
