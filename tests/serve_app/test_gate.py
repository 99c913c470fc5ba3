"""The ingress's gate over real admission (a real Redis): a request's worst case reserved for
every completion, and a settlement above the reservation never silent."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis
from sqlalchemy import Engine
from starlette.requests import Request

from billing.admission import Admission
from billing.plans import Plans
from kernel import redis_keys as rk
from serve_app.gate import Gate
from serve_app.streaming import Usage
from tests.billing import conftest as billing
from tests.billing.conftest import IN, MODEL, OUT, USD, make_customer, redis_int

# the billing tests' fixtures: a real Redis (a test database) and SQLite
sqlite_engine, r, ar = billing.sqlite_engine, billing.r, billing.ar
plans, admission = billing.plans, billing.admission


def request(key: str, request_id: str) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "headers": [(b"authorization", f"Bearer {key}".encode())]}  # fmt: skip
    req = Request(scope)
    req.state.request_id = request_id
    return req


async def test_an_overrun_is_billed_logged_with_the_request_id(
    sqlite_engine: Engine,
    r: redis.Redis,
    plans: Plans,
    admission: Admission,
    caplog: pytest.LogCaptureFixture,
) -> None:
    customer = make_customer(sqlite_engine, r, plans, plan="paid", usd=1)
    gate = Gate(admission)
    admitted = await gate.admit(request(customer.key, "req_over"), MODEL, 56, 16, completions=4)
    assert admitted.max_tokens == 16
    assert redis_int(r, rk.balance(customer.account_id)) == USD - 56 * IN - 64 * OUT
    with caplog.at_level(logging.ERROR, logger="darkgpu.ingress"):
        gate.settle("req_over", Usage(56, 100), "prov-1", model=MODEL.id)
        await asyncio.gather(*gate._settling)
    assert redis_int(r, rk.balance(customer.account_id)) == USD - 56 * IN - 100 * OUT
    [record] = [rec for rec in caplog.records if "RESERVATION OVERRUN" in rec.getMessage()]
    assert "req_over" in record.getMessage() and "36 above its reservation" in record.getMessage()
