"""Metering as a consumer meets it, through the official SDK against the real platform:
keys, refusals with their headers, caps that lower max_tokens, credits, the usage ledger,
and races that must never overshoot a cap or a balance."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import httpx
import openai
import pytest

from tests.exact_tokens import EXACT

LOCAL = "darkgpu-tiny"
MSG = [{"role": "user", "content": "Tell me a story about a small robot."}]
RATE_HEADERS = [f"x-ratelimit-{kind}-{what}" for kind in ("limit", "remaining", "reset")
                for what in ("requests", "tokens")]  # fmt: skip


def sdk(platform, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=platform.api_url, api_key=key, max_retries=0)


def account_usage(platform, key: str, expected_requests: int, timeout: float = 60) -> dict:
    """/v1/usage by model, once the billing actor has drained every request into SQL."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(
            f"{platform.api_url}/usage",
            params={"group_by": "model"},
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        rows = response.json()["data"]
        total = {"requests": sum(r["requests"] for r in rows),
                 "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
                 "completion_tokens": sum(r["completion_tokens"] for r in rows),
                 "cost_nusd": sum(r["cost_nusd"] for r in rows)}  # fmt: skip
        if total["requests"] >= expected_requests or time.monotonic() > deadline:
            return total
        time.sleep(1)


def test_a_request_without_a_key_is_refused(platform):
    for path in ("/models", "/credits", "/usage"):
        response = httpx.get(platform.api_url + path, timeout=30)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "auth"
    response = httpx.post(f"{platform.api_url}/chat/completions", timeout=30,
                          json={"model": LOCAL, "messages": MSG})  # fmt: skip
    assert response.status_code == 401
    assert response.headers["x-darkgpu-request-id"].startswith("req_")


@pytest.mark.parametrize("key", ["not-a-key", "dgpu-" + "0" * 43, "Bearer"])
def test_malformed_and_unknown_keys_are_refused(platform, key):
    client = openai.OpenAI(base_url=platform.api_url, api_key=key, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model=LOCAL, messages=MSG, max_tokens=2)
    assert info.value.body["type"] == "auth"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_a_revoked_key_stops_working_at_once(platform):
    _, key = platform.new_key("paid")
    account = platform.admin("key", "list", "--account", str(_account_of(platform, key)))
    client = sdk(platform, key)
    client.models.list()
    platform.admin("key", "revoke", "--key-id", str(account[0]["id"]))
    with pytest.raises(openai.AuthenticationError):  # the very next request, within 1 s
        client.chat.completions.create(model=LOCAL, messages=MSG, max_tokens=2)


def _account_of(platform, key: str) -> int:
    response = httpx.get(
        f"{platform.api_url}/credits", headers={"authorization": f"Bearer {key}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()["account_id"]


def test_success_carries_rate_limit_headers_and_the_usage_is_billed(platform):
    account_id, key = platform.new_key("free")
    before = httpx.get(
        f"{platform.api_url}/credits", headers={"authorization": f"Bearer {key}"}
    ).json()
    assert before["balance_usd"] == "10" or before["balance_nusd"] == 10 * 10**9
    raw = sdk(platform, key).chat.completions.with_raw_response.create(
        model=LOCAL, messages=MSG, max_tokens=7, extra_body=EXACT
    )
    for name in RATE_HEADERS:
        assert name in raw.headers, name
    assert raw.headers["x-ratelimit-limit-requests"] == "60"
    assert raw.headers["x-ratelimit-limit-tokens"] == "200000"
    usage = raw.parse().usage
    billed = account_usage(platform, key, 1)
    assert billed["requests"] == 1
    assert billed["prompt_tokens"] == usage.prompt_tokens
    assert billed["completion_tokens"] == usage.completion_tokens == 7
    assert billed["cost_nusd"] == usage.prompt_tokens * 15 + 7 * 60
    after = httpx.get(
        f"{platform.api_url}/credits", headers={"authorization": f"Bearer {key}"}
    ).json()
    assert after["tokens_used_today"] == usage.total_tokens
    assert after["tokens_per_day"] == 200_000
    assert after["balance_nusd"] == 10 * 10**9 - billed["cost_nusd"]
    assert after["resets_at"].endswith("T00:00:00Z")


def test_a_daily_cap_lowers_max_tokens_then_refuses_until_midnight(platform):
    account_id, key = platform.new_key("free")
    platform.admin("cap", "set", "--account", str(account_id), "--tokens-per-day", "40")
    client = sdk(platform, key)
    first = client.chat.completions.create(
        model=LOCAL, messages=MSG, max_tokens=100, extra_body=EXACT
    )
    assert first.choices[0].finish_reason == "length"
    assert first.usage.total_tokens == 40  # the cap's room, not the 100 asked for
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=LOCAL, messages=MSG, max_tokens=5)
    error = info.value
    assert error.body["type"] == "rate_limit" and error.body["code"] == "daily_cap_exceeded"
    assert 0 < int(error.response.headers["retry-after"]) <= 86_400
    assert error.response.headers["x-ratelimit-remaining-tokens"] == "0"


def test_a_customer_tag_has_its_own_cap(platform):
    account_id, key = platform.new_key("free")
    platform.admin("cap", "set", "--account", str(account_id), "--tokens-per-day", "30",
                   "--customer", "acme")  # fmt: skip
    client = sdk(platform, key)
    tagged = client.with_options(default_headers={"X-Customer-Id": "acme"})
    assert (
        tagged.chat.completions.create(
            model=LOCAL, messages=MSG, max_tokens=50, extra_body=EXACT
        ).usage.total_tokens
        == 30
    )
    with pytest.raises(openai.RateLimitError):
        tagged.chat.completions.create(model=LOCAL, messages=MSG, max_tokens=5)
    other = client.chat.completions.create(
        model=LOCAL, messages=MSG, max_tokens=5, extra_body=EXACT
    )
    assert other.usage.completion_tokens == 5


def test_requests_per_minute(platform):
    account_id, key = platform.new_key("free")
    platform.admin("account", "update", "--account", str(account_id), "--rpm", "2")
    client = sdk(platform, key)
    for _ in range(2):
        client.chat.completions.create(model=LOCAL, messages=MSG, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=LOCAL, messages=MSG, max_tokens=1)
    assert info.value.body["code"] == "rate_limit_exceeded"
    assert int(info.value.response.headers["retry-after"]) >= 1


def test_out_of_credits_is_402_billing(platform):
    _, key = platform.new_key("paid")  # a paid account starts with no credits
    with pytest.raises(openai.APIStatusError) as info:
        sdk(platform, key).chat.completions.create(model=LOCAL, messages=MSG, max_tokens=5)
    assert info.value.status_code == 402
    assert info.value.body["type"] == "billing"


def test_a_disconnected_stream_is_billed_what_was_sent(platform):
    account_id, key = platform.new_key("free")
    with httpx.stream("POST", f"{platform.api_url}/chat/completions", timeout=60,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": LOCAL, "messages": MSG, "max_tokens": 200, "stream": True,
                            "ignore_eos": True}) as response:  # fmt: skip
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6), strict=False) if line]
    assert received
    billed = account_usage(platform, key, 1)
    assert billed["requests"] == 1
    assert 1 <= billed["completion_tokens"] < 200


def _race(platform, key: str, n: int, max_tokens: int) -> list:
    async def main():
        async with openai.AsyncOpenAI(base_url=platform.api_url, api_key=key,
                                      max_retries=0, timeout=300) as client:  # fmt: skip

            async def one(i):
                try:
                    return await client.chat.completions.create(
                        model=LOCAL,
                        max_tokens=max_tokens,
                        extra_body=EXACT,
                        messages=[{"role": "user", "content": f"Race number {i}"}],
                    )
                except (openai.RateLimitError, openai.APIStatusError) as exc:
                    return exc

            return await asyncio.gather(*(one(i) for i in range(n)))

    return asyncio.run(main())


def test_two_hundred_racing_requests_never_overshoot_the_daily_cap(platform):
    account_id, key = platform.new_key("free")
    platform.admin("cap", "set", "--account", str(account_id), "--tokens-per-day", "2000")
    results = _race(platform, key, 200, 60)
    answered = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert answered and refused
    assert all(r.status_code == 429 for r in refused)
    reported = sum(r.usage.total_tokens for r in answered)
    assert reported <= 2000
    billed = account_usage(platform, key, len(answered))
    assert billed["requests"] == len(answered)  # one ledger row per answered request
    assert billed["prompt_tokens"] + billed["completion_tokens"] == reported


def test_two_hundred_racing_requests_never_overdraw_the_credits(platform):
    account_id, key = platform.new_key("paid")
    # about 20 requests: ~10 prompt tokens at 15 nUSD + 60 completion tokens at 60 nUSD
    platform.admin("credits", "grant", "--account", str(account_id), "--usd", "0.000075")
    results = _race(platform, key, 200, 60)
    answered = [r for r in results if not isinstance(r, Exception)]
    assert 5 <= len(answered) <= 40
    assert all(r.status_code == 402 for r in results if isinstance(r, Exception))
    billed = account_usage(platform, key, len(answered))
    assert billed["requests"] == len(answered)
    assert billed["cost_nusd"] <= 75_000
    assert billed["completion_tokens"] == sum(r.usage.completion_tokens for r in answered)
    credits = httpx.get(
        f"{platform.api_url}/credits", headers={"authorization": f"Bearer {key}"}
    ).json()
    assert credits["balance_nusd"] == 75_000 - billed["cost_nusd"] >= 0


def _verify(platform, database: Path | None = None) -> tuple[int, dict]:
    """`darkgpu admin ledger verify`, on the platform's database or on `database`."""
    if database is not None:
        env = {**platform.env, "DARKGPU_DATABASE_URL": f"sqlite:///{database}"}
        platform = dataclasses.replace(platform, env=env)
    args = ("--full",) if database is not None else ()  # the copy: every row, no checkpoint
    done = platform.darkgpu("admin", "ledger", "verify", *args, timeout=120)
    return done.returncode, json.loads(done.stdout)


def test_the_ledger_verifies(platform, tmp_path):
    """The ledger holds what was served (this request at least) and verifies, counting every
    row; a row changed behind the append-only triggers' back is caught. The change is made on
    a copy: the platform's own ledger is never touched."""
    _, key = platform.new_key("paid", usd="1")
    sdk(platform, key).chat.completions.create(model=LOCAL, messages=MSG, max_tokens=3)
    assert account_usage(platform, key, 1)["requests"] == 1
    copy = tmp_path / "ledger.db"
    live = Path(platform.env["DARKGPU_DATA_DIR"]) / "darkgpu.db"
    with closing(sqlite3.connect(live)) as source, closing(sqlite3.connect(copy)) as target:
        source.backup(target)  # a consistent snapshot while the billing actor writes
    with closing(sqlite3.connect(copy)) as db:
        [(rows, billed_row)] = db.execute(
            "SELECT count(*), max(CASE WHEN cost_nusd > 0 THEN id END) FROM usage_events"
        ).fetchall()
    assert rows >= 1 and billed_row is not None

    code, live_report = _verify(platform)
    assert code == 0 and live_report["ok"], live_report
    assert live_report["usage_rows_total"] >= rows  # the live ledger only grows
    code, report = _verify(platform, copy)
    assert code == 0 and report["ok"] and report["usage_rows"] == rows, report

    with closing(sqlite3.connect(copy)) as db, db:
        for action in ("update", "delete"):
            db.execute(f"DROP TRIGGER usage_events_no_{action}")
        db.execute(
            "UPDATE usage_events SET completion_tokens = completion_tokens + 1 WHERE id = ?",
            (billed_row,),
        )
    code, report = _verify(platform, copy)
    assert code == 1 and not report["ok"], report
    assert any(p.startswith(f"usage row {billed_row} (") for p in report["problems"]), report
