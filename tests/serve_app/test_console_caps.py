"""Daily caps set by the customer in the console, on the app `create_app` builds, real SQLite
or PostgreSQL and a real Redis: the customer's own cap only lowers the one that applies, and
the admission script enforces what the page says; customer-tag caps are added and removed;
what a hostile form sends is refused in words and changes nothing."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aredis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from billing import accounts
from billing.admission import Admission, Admitted, Refused
from kernel import redis_keys as rk
from kernel.tokens import hash_key
from serve_app.services import Services
from tests.billing import conftest as billing
from tests.billing.conftest import MODEL
from tests.serve_app.test_console_app import REDIS_URL, signed_up
from tests.serve_app.test_console_keys import app, svc

db_url = billing.db_url
__all__ = ["app", "svc"]  # the fixtures: the app on a fresh database and Redis


def admit(svc: Services, key: str, request_id: str, max_tokens: int, tag: str | None = None):
    async def run():
        r = aredis.Redis.from_url(REDIS_URL)
        try:
            return await Admission(r, svc.plans).admit(
                api_key=key, request_id=request_id, model=MODEL, prompt_tokens=10,
                max_tokens=max_tokens, customer_tag=tag,
            )  # fmt: skip
        finally:
            await r.aclose()

    return asyncio.run(run())


def test_the_customer_sets_and_removes_its_own_daily_cap(app: FastAPI, svc: Services) -> None:
    c, csrf = signed_up(app, "caps@example.com")
    account = accounts.find_account(svc.db, "caps@example.com")
    assert account is not None
    free = svc.plans.get(svc.plans.default_plan).tokens_per_day
    page = c.get("/console/caps")
    assert page.status_code == 200 and f"{free:,} tokens a day" in page.text
    saved = c.post("/console/caps/daily", data={"csrf_token": csrf, "tokens_per_day": "1,000"})
    assert saved.status_code == 303 and saved.headers["location"] == "/console/caps?done=daily"
    assert accounts.daily_caps(svc.db, svc.plans, account.id).applies == 1000
    assert svc.redis.hget(rk.account(account.id), "own") == b"1000"
    key = accounts.create_key(svc.db, svc.redis, account_id=account.id).key
    assert key is not None
    granted = admit(svc, key, "a", 5000)
    assert isinstance(granted, Admitted) and granted.max_tokens == 990  # 10 prompt + 990
    refused = admit(svc, key, "b", 1)
    assert isinstance(refused, Refused) and refused.code == "daily_cap_exceeded"
    # above the plan's cap: the plan's still applies (only the operator raises it)
    c.post("/console/caps/daily", data={"csrf_token": csrf, "tokens_per_day": str(free * 10)})
    assert accounts.daily_caps(svc.db, svc.plans, account.id).applies == free
    c.post("/console/caps/daily", data={"csrf_token": csrf, "tokens_per_day": ""})
    caps = accounts.daily_caps(svc.db, svc.plans, account.id)
    assert (caps.own, caps.applies) == (None, free)
    assert svc.redis.hget(rk.account(account.id), "own") is None


def test_customer_caps_are_added_and_removed(app: FastAPI, svc: Services) -> None:
    c, csrf = signed_up(app, "tags@example.com")
    account = accounts.find_account(svc.db, "tags@example.com")
    assert account is not None
    for tag, tokens in (("acme", "300"), ("*", "2,000"), ("acme", "400")):
        fields = {"csrf_token": csrf, "customer_tag": tag, "tokens_per_day": tokens}
        done = c.post("/console/caps/customers", data=fields)
        assert done.status_code == 303
    assert accounts.customer_caps(svc.db, account.id) == {"*": 2000, "acme": 400}
    assert svc.redis.hgetall(rk.tag_caps(account.id)) == {b"*": b"2000", b"acme": b"400"}
    page = c.get("/console/caps?done=customer").text
    assert "<code>acme</code>" in page and "Remove the cap of acme" in page
    c.post("/console/caps/customers",
           data={"csrf_token": csrf, "customer_tag": "acme", "tokens_per_day": ""})  # fmt: skip
    assert accounts.customer_caps(svc.db, account.id) == {"*": 2000}
    # a bounded number of them: each is a field of the account's record in the money Redis
    for n in range(accounts.MAX_CUSTOMER_CAPS - 1):
        accounts.set_customer_cap(svc.db, None, account_id=account.id, customer_tag=f"t{n}",
                                  tokens_per_day=1)  # fmt: skip
    fields = {"csrf_token": csrf, "customer_tag": "one-too-many", "tokens_per_day": "5"}
    refused = c.post("/console/caps/customers", data=fields)
    assert refused.status_code == 400 and "at most 1,000 customer caps" in refused.text
    assert len(accounts.customer_caps(svc.db, account.id)) == accounts.MAX_CUSTOMER_CAPS


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/console/caps/daily", {"tokens_per_day": "-5"}),
        ("/console/caps/daily", {"tokens_per_day": "1e9"}),
        ("/console/caps/daily", {"tokens_per_day": "9" * 40}),  # past BIGINT and Lua's doubles
        ("/console/caps/daily", {"tokens_per_day": "١٢٣"}),  # digits, not ASCII ones
        ("/console/caps/customers", {"customer_tag": "", "tokens_per_day": "5"}),
        ("/console/caps/customers", {"customer_tag": "x" * 257, "tokens_per_day": "5"}),
        ("/console/caps/customers", {"customer_tag": "acme", "tokens_per_day": "lots"}),
    ],
)
def test_hostile_forms_are_refused_in_words_and_change_nothing(
    app: FastAPI, svc: Services, path: str, fields: dict[str, str]
) -> None:
    c, csrf = signed_up(app, "hostile@example.com")
    account = accounts.find_account(svc.db, "hostile@example.com")
    assert account is not None
    before = (accounts.daily_caps(svc.db, svc.plans, account.id),
              accounts.customer_caps(svc.db, account.id))  # fmt: skip
    refused = c.post(path, data={"csrf_token": csrf, **fields})
    assert refused.status_code == 400 and 'role="alert"' in refused.text
    assert (accounts.daily_caps(svc.db, svc.plans, account.id),
            accounts.customer_caps(svc.db, account.id)) == before  # fmt: skip
    no_csrf = c.post(path, data={**fields, "tokens_per_day": "5", "customer_tag": "t"})
    assert no_csrf.status_code == 403
    assert accounts.customer_caps(svc.db, account.id) == before[1]


def test_caps_need_a_session(app: FastAPI) -> None:
    from tests.serve_app.test_console_app import client

    anonymous = client(app)
    assert anonymous.get("/console/caps").status_code == 303
    assert anonymous.post("/console/caps/daily", data={"tokens_per_day": "1"}).status_code in (
        303,
        403,
    )


def test_caps_over_the_api_are_the_callers_own(app: FastAPI, svc: Services) -> None:
    signed_up(app, "alice@example.com")
    signed_up(app, "bob@example.com")
    alice_id = accounts.find_account(svc.db, "alice@example.com").id  # type: ignore[union-attr]
    bob_id = accounts.find_account(svc.db, "bob@example.com").id  # type: ignore[union-attr]
    alice_key = accounts.create_key(svc.db, svc.redis, account_id=alice_id).key
    free = svc.plans.get(svc.plans.default_plan).tokens_per_day
    with TestClient(app) as api:
        auth = {"authorization": f"Bearer {alice_key}"}
        shown = api.get("/v1/caps", headers=auth).json()
        assert shown["tokens_per_day"] == free and shown["own_tokens_per_day"] is None
        lowered = api.post("/v1/caps/daily", headers=auth, json={"tokens_per_day": 500})
        assert lowered.status_code == 200 and lowered.json()["tokens_per_day"] == 500
        tagged = api.post("/v1/caps/customers", headers=auth,
                          json={"customer_tag": "acme", "tokens_per_day": 50})  # fmt: skip
        assert tagged.json()["customers"] == {"acme": 50}
        # no field names another account: bob's caps are untouched
        assert accounts.daily_caps(svc.db, svc.plans, bob_id).own is None
        assert accounts.customer_caps(svc.db, bob_id) == {}
        for body in ({"tokens_per_day": -1}, {"tokens_per_day": "500"},
                     {"tokens_per_day": 10**13}, {"tokens_per_day": 5, "account_id": bob_id},
                     {}):  # fmt: skip
            bad = api.post("/v1/caps/daily", headers=auth, json=body)
            assert bad.status_code == 400, (body, bad.text)
            assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
        bad_tag = api.post("/v1/caps/customers", headers=auth,
                           json={"customer_tag": "x" * 257, "tokens_per_day": 1})  # fmt: skip
        assert bad_tag.status_code == 400
        assert api.get("/v1/caps").status_code == 401
        assert api.post("/v1/caps/daily", json={"tokens_per_day": 1}).status_code == 401
        removed = api.post("/v1/caps/daily", headers=auth, json={"tokens_per_day": None})
        assert removed.json()["own_tokens_per_day"] is None
    assert accounts.daily_caps(svc.db, svc.plans, alice_id).applies == free


def test_a_keys_cap_is_set_in_its_row_and_only_for_the_accounts_own_keys(
    app: FastAPI, svc: Services
) -> None:
    c, csrf = signed_up(app, "keycap@example.com")
    account_id = accounts.find_account(svc.db, "keycap@example.com").id  # type: ignore[union-attr]
    key = accounts.create_key(svc.db, svc.redis, account_id=account_id, name="script")
    theirs = accounts.create_key(svc.db, svc.redis, account_id=billing_customer(svc))
    page = c.get("/console/caps").text
    assert f'data-key-id="{key.id}"' in page and "Daily cap of key script" in page
    fields = {"csrf_token": csrf, "key_id": str(key.id), "tokens_per_day": "800"}
    saved = c.post("/console/caps/keys", data=fields)
    assert saved.status_code == 303 and saved.headers["location"] == "/console/caps?done=key"
    assert svc.redis.hget(rk.api_key(hash_key(key.key or "")), "tpd") == b"800"
    granted = admit(svc, key.key or "", "a", 5000)
    assert isinstance(granted, Admitted) and granted.max_tokens == 790
    for key_id in (str(theirs.id), "0", "-1", "abc", "9" * 30):
        fields = {"csrf_token": csrf, "key_id": key_id, "tokens_per_day": "1"}
        stolen = c.post("/console/caps/keys", data=fields)
        assert stolen.status_code == 404, key_id
    assert svc.redis.hget(rk.api_key(hash_key(theirs.key or "")), "tpd") is None
    with TestClient(app) as api:
        auth = {"authorization": f"Bearer {key.key}"}
        shown = api.get("/v1/caps", headers=auth).json()
        assert shown["keys"] == {str(key.id): 800}
        other = api.post("/v1/caps/keys", headers=auth,
                         json={"key_id": theirs.id, "tokens_per_day": 1})  # fmt: skip
        assert other.status_code == 404 and other.json()["error"]["code"] == "key_not_found"
        cleared = api.post("/v1/caps/keys", headers=auth,
                           json={"key_id": key.id, "tokens_per_day": None})  # fmt: skip
        assert cleared.status_code == 200 and cleared.json()["keys"] == {}
    assert svc.redis.hget(rk.api_key(hash_key(key.key or "")), "tpd") is None


def billing_customer(svc: Services) -> int:
    """Another account, with a key of its own."""
    return billing.make_customer(svc.db, svc.redis, svc.plans, usd=1).account_id
