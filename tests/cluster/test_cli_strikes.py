"""`darkgpu admin provider strikes [--provider ID]` through the `darkgpu` command, against real
SQLite: the strikes the meter recorded (billing.strikes), newest first."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from billing import accounts, strikes
from billing.plans import load_plans
from cluster import registry
from core.db import make_engine, migrate
from core.settings import DEFAULT_PLANS_FILE
from darkgpu.cli import app
from kernel.money import split_cost
from kernel.usage_event import UsageRecord

runner = CliRunner()


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'platform.db'}"
    monkeypatch.setenv("DARKGPU_DATABASE_URL", url)
    monkeypatch.setenv("DARKGPU_DATA_DIR", str(tmp_path / "data"))
    eng = make_engine(url)
    migrate(eng)
    yield eng
    eng.dispose()


def settled(rid: str, provider: str, counted: int, reported: int, at_ms: int) -> UsageRecord:
    cost = 10 * 1000 + counted * 2000
    provider_share, platform_share = split_cost(cost)
    return UsageRecord(
        request_id=rid, account_id=1, key_id=None, customer_tag=None, model="m",
        provider_id=provider, prompt_tokens=10, completion_tokens=counted,
        input_nusd_per_token=1000, output_nusd_per_token=2000, cost_nusd=cost,
        provider_share_nusd=provider_share, platform_share_nusd=platform_share,
        outcome="settled", usage_day="2026-12-02", created_at_ms=at_ms - 5, settled_at_ms=at_ms,
        reported_completion_tokens=reported,
    )  # fmt: skip


def darkgpu(*args: str, code: int = 0) -> tuple[str, str]:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result.stdout, result.stderr


def test_the_operator_lists_strikes_newest_first_and_by_provider(engine: Engine) -> None:
    owner = accounts.create_account(
        engine, None, load_plans(DEFAULT_PLANS_FILE), email="rigs@example.com"
    )
    bad = registry.create_provider(engine, account_id=owner.id, name="bad").provider.id
    other = registry.create_provider(engine, account_id=owner.id, name="other").provider.id
    events = [
        settled("r1", bad, 20, 480, 1_764_000_000_000),
        settled("r2", other, 3, 90, 1_764_000_001_000),
        settled("r3", bad, 7, 300, 1_764_000_002_000),
        settled("r4", bad, 50, 52, 1_764_000_003_000),  # within the tolerance: no strike
    ]
    with Session(engine) as session, session.begin():
        assert len(strikes.record(session, events)) == 3
    every = json.loads(darkgpu("admin", "provider", "strikes")[0])
    assert [s["request_id"] for s in every] == ["r3", "r2", "r1"]
    assert every[0] == {
        "provider_id": bad, "request_id": "r3", "model": "m", "reported_tokens": 300,
        "counted_tokens": 7, "created_at": "2025-11-24T16:00:02+00:00",
    }  # fmt: skip
    mine = json.loads(darkgpu("admin", "provider", "strikes", "--provider", bad)[0])
    assert [s["request_id"] for s in mine] == ["r3", "r1"]
    assert (
        json.loads(darkgpu("admin", "provider", "strikes", "--limit", "1")[0])[0]["request_id"]
        == "r3"
    )
    _, err = darkgpu("admin", "provider", "strikes", "--provider", "prv_nobody", code=1)
    assert "error: No provider 'prv_nobody'." in err
