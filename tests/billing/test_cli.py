import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from billing import accounts as svc
from billing.admission import Admission
from billing.cli import app
from billing.flags import holds
from billing.meter import UsageMeter
from kernel import redis_keys as rk
from kernel.tokens import hash_key
from tests.billing.conftest import MODEL, REDIS_URL, REPO, USD


@pytest.fixture
def cli(engine: Engine, db_url: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DARKGPU_DATABASE_URL", db_url)
    monkeypatch.setenv("DARKGPU_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("DARKGPU_PLANS_FILE", str(REPO / "configs" / "plans.toml"))
    runner = CliRunner()

    def run(*args: str, code: int = 0, says: str | None = None) -> str:
        """The command's stdout, once it exited with `code` (and said `says` on stderr)."""
        result = runner.invoke(app, list(args))
        assert result.exit_code == code, (result.output, result.exception)
        if says is not None:
            assert says in " ".join(result.stderr.split()), result.stderr
        return result.stdout

    return run


def test_account_key_credits_and_caps(cli, r: redis.Redis, engine: Engine) -> None:
    account = json.loads(cli("account", "create", "--email", "cli@example.com", "--plan", "free"))
    assert account["email"] == "cli@example.com" and account["balance_nusd"] == 10 * USD
    aid = str(account["id"])
    cli("account", "create", "--email", "cli@example.com", code=1)
    cli("account", "create", "--email", "x@example.com", "--plan", "gold", code=1)

    key = json.loads(cli("key", "create", "--account", aid, "--name", "laptop"))
    assert key["key"].startswith("dgpu-") and key["prefix"] == key["key"][:12]
    assert r.hget(rk.api_key(hash_key(key["key"])), "account") == aid.encode()
    listed = json.loads(cli("key", "list", "--account", aid))
    assert [k["prefix"] for k in listed] == [key["prefix"]] and "key" not in listed[0]

    granted = json.loads(
        cli("credits", "grant", "--account", aid, "--usd", "2.50", "--idempotency-key", "promo-7")
    )
    assert granted["balance_nusd"] == 12_500_000_000 and granted["granted"]
    again = json.loads(
        cli("credits", "grant", "--account", aid, "--usd", "2.50", "--idempotency-key", "promo-7")
    )
    assert again["balance_nusd"] == 12_500_000_000 and not again["granted"]
    cli("credits", "grant", "--account", aid, "--usd", "0.0000000001", code=1)
    shown = json.loads(cli("credits", "show", "--account", aid))
    assert shown["balance_usd"] == "12.5" and shown["available_nusd"] == 12_500_000_000

    cli("cap", "set", "--account", aid, "--tokens-per-day", "1234")
    assert r.hget(rk.account(int(aid)), "tpd") == b"1234"
    cli("cap", "set", "--account", aid, "--tokens-per-day", "99", "--customer", "acme")
    assert r.hget(rk.tag_caps(int(aid)), "acme") == b"99"
    cli("cap", "set", "--account", aid, "--clear", "--customer", "acme")
    assert not r.exists(rk.tag_caps(int(aid)))
    cli("cap", "set", "--account", aid, code=1)
    # the console's operator pages: only this command grants them
    assert json.loads(cli("account", "update", "--account", aid, "--operator"))["operator"]
    assert svc.is_operator(engine, int(aid))
    cli("account", "update", "--account", aid, "--no-operator")
    assert not svc.is_operator(engine, int(aid))
    shown = json.loads(cli("account", "show", "--account", aid))
    assert shown["credits"]["tokens_per_day"] == 1234

    updated = json.loads(cli("account", "update", "--account", aid, "--plan", "paid", "--rpm", "5"))
    assert updated["plan"] == "paid"
    assert r.hmget(rk.account(int(aid)), "plan", "rpm") == [b"paid", b"5"]

    revoked = json.loads(cli("key", "revoke", "--prefix", key["prefix"]))
    assert revoked["revoked_at"] is not None
    assert not r.exists(rk.api_key(hash_key(key["key"])))
    second = json.loads(cli("key", "create", "--account", aid))
    cli("key", "revoke", "--key-id", str(second["id"]))
    assert not r.exists(rk.api_key(hash_key(second["key"])))
    cli("key", "revoke", "--key-id", "999", code=1)


async def test_usage_export_and_ledger_verify(
    cli, engine: Engine, r: redis.Redis, admission: Admission, meter: UsageMeter
) -> None:
    aid = json.loads(cli("account", "create", "--email", "u@example.com"))["id"]
    key = json.loads(cli("key", "create", "--account", str(aid)))["key"]
    when = (datetime.now(UTC) + timedelta(days=2)).replace(
        hour=9, minute=0, second=0, microsecond=0
    )
    for i in range(3):
        await admission.admit(
            api_key=key,
            request_id=f"q{i}",
            model=MODEL,
            prompt_tokens=5,
            max_tokens=10,
            customer_tag="c1",
            now=when.timestamp() + i,
        )
        await admission.settle(
            request_id=f"q{i}", prompt_tokens=5, completion_tokens=7, provider_id="prov"
        )
    meter.drain_all()
    day = when.strftime("%Y-%m-%d")
    next_day = (when + timedelta(days=1)).strftime("%Y-%m-%d")
    out = cli("usage", "export", "--start", day, "--end", next_day, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row["request_id"] for row in rows] == ["q0", "q1", "q2"]
    assert rows[0]["customer_tag"] == "c1" and rows[0]["completion_tokens"] == "7"
    grouped = json.loads(
        cli("usage", "export", "--start", day, "--end", next_day, "--group-by", "customer")
    )
    assert grouped == [
        {
            "group": "c1",
            "requests": 3,
            "prompt_tokens": 15,
            "completion_tokens": 21,
            "total_tokens": 36,
            "cost_nusd": grouped[0]["cost_nusd"],
            "cost_usd": grouped[0]["cost_usd"],
        }
    ]
    cli("usage", "export", "--start", "yesterday", "--end", next_day, code=2,
        says="not an ISO date or time: 'yesterday'")  # fmt: skip

    verified = json.loads(cli("ledger", "verify"))
    assert verified["ok"] and verified["usage_rows"] == 3
    with engine.begin() as conn:  # plant a forged usage row
        conn.execute(
            text(
                "INSERT INTO usage_events (request_id, account_id, model, provider_id, "
                "prompt_tokens, completion_tokens, input_nusd_per_token, output_nusd_per_token,"
                " cost_nusd, provider_share_nusd, platform_share_nusd, outcome, usage_day, "
                "created_at_ms, settled_at_ms, prev_hash, row_hash) VALUES ('forged', :a, 'm',"
                " 'p', 0, 0, 0, 0, 0, 0, 0, 'settled', '2025-01-01', 0, 0, :h, :h)"
            ),
            {"a": aid, "h": "b" * 64},
        )
    failed = json.loads(cli("ledger", "verify", code=1))
    assert not failed["ok"] and failed["problems"]


async def test_ledger_verify_from_its_checkpoint(
    cli, engine: Engine, admission: Admission, meter: UsageMeter
) -> None:
    """Each pass writes a checkpoint and says which one it started from and how many rows it
    read; `--full` starts from the first row and finds a change before the checkpoint."""
    aid = json.loads(cli("account", "create", "--email", "v@example.com"))["id"]
    key = json.loads(cli("key", "create", "--account", str(aid)))["key"]

    async def serve(ids: range) -> None:
        for i in ids:
            await admission.admit(
                api_key=key,
                request_id=f"v{i}",
                model=MODEL,
                prompt_tokens=5,
                max_tokens=10,
                customer_tag=None,
            )
            await admission.settle(request_id=f"v{i}", prompt_tokens=5, completion_tokens=7,
                                   provider_id="prov")  # fmt: skip
        assert meter.drain_all() == len(ids)

    await serve(range(3))
    # a negative margin would put the boundary ahead of rows not yet committed
    cli("ledger", "verify", "--margin", "-1", code=2)
    first = json.loads(cli("ledger", "verify", "--margin", "0"))
    assert first["ok"] and first["full"] and first["from_checkpoint"] is None
    assert (first["usage_rows"], first["transfers"]) == (3, 4)  # the signup grant and 3
    assert first["checkpoint"]["usage_rows"] == 3
    await serve(range(3, 5))
    second = json.loads(cli("ledger", "verify", "--margin", "0"))
    assert second["ok"] and not second["full"]
    assert second["from_checkpoint"] == first["checkpoint"]
    assert (second["usage_rows"], second["transfers"], second["usage_rows_total"]) == (2, 2, 5)

    with engine.begin() as conn:  # behind the append-only triggers' back, before the checkpoint
        if engine.dialect.name == "postgresql":
            conn.execute(text("ALTER TABLE usage_events DISABLE TRIGGER USER"))
        else:
            conn.execute(text("DROP TRIGGER usage_events_no_update"))
        conn.execute(text("UPDATE usage_events SET completion_tokens = 1 WHERE request_id = 'v0'"))
        if engine.dialect.name == "postgresql":
            conn.execute(text("ALTER TABLE usage_events ENABLE TRIGGER USER"))
    trusted = json.loads(cli("ledger", "verify"))
    assert trusted["ok"] and trusted["usage_rows"] == 0
    full = json.loads(cli("ledger", "verify", "--full", code=1))
    assert not full["ok"] and full["full"] and full["usage_rows"] == 5
    assert any("(v0): row_hash does not match" in p for p in full["problems"])
    assert full["checkpoint"] is None
    assert "trusts the append-only" in " ".join(cli("ledger", "verify", "--help").split())


def test_redis_rebuild_and_db_upgrade(cli, r: redis.Redis) -> None:
    aid = json.loads(cli("account", "create", "--email", "rb@example.com"))["id"]
    r.flushdb()
    report = json.loads(cli("redis", "rebuild"))
    assert report["accounts"] == 1
    assert int(r.get(rk.balance(aid))) == 10 * USD
    assert "newest revision" in cli("db", "upgrade")


def test_redis_unreachable_is_reported(
    cli, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 2 is also what any usage error gives: the message and SQL say which it was."""
    monkeypatch.setenv("DARKGPU_REDIS_URL", "redis://127.0.0.1:1/0")
    cli("account", "create", "--email", "down@example.com", code=2,
        says="error: Redis not updated")  # fmt: skip
    with engine.connect() as conn:  # as it says: SQL holds the change
        emails = conn.execute(text("SELECT email FROM accounts")).scalars().all()
    assert emails == ["down@example.com"]


def test_an_operator_lists_and_resolves_the_flags_that_hold_payouts(cli, engine: Engine) -> None:
    """A refund of spent credits flags the account (billing.webhooks): its providers are not
    paid until an operator resolves the flag, which is only possible from this command."""
    aid = json.loads(cli("account", "create", "--email", "flagged@example.com"))["id"]
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO account_flags (account_id, reason, stripe_id, unrecovered_nusd, "
                 "event_id, created_at) VALUES (:a, 'refund_after_spend', 're_1', 5, 'evt_1', "
                 ":now)"),
            {"a": aid, "now": datetime.now(UTC)},
        )  # fmt: skip
    [flag] = json.loads(cli("account", "flags", "--account", str(aid)))
    assert flag["says"] == "a refund of credits it had spent" and flag["resolved_at"] is None
    with Session(engine) as session:
        assert holds(session, aid) == ["a refund of credits it had spent"]
    resolved = json.loads(cli("account", "resolve-flag", str(flag["id"])))
    assert resolved["resolved_at"] is not None
    with Session(engine) as session:
        assert holds(session, aid) == []
    assert json.loads(cli("account", "flags")) == []  # open ones only
    assert [f["id"] for f in json.loads(cli("account", "flags", "--all"))] == [flag["id"]]
    cli("account", "resolve-flag", str(flag["id"]), code=1, says="was resolved at")
    cli("account", "resolve-flag", "999999", code=1, says="no account flag 999999")
