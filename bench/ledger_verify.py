"""Ledger verification, full against incremental (issue 13), on PostgreSQL.

Writes `--rows` paid usage rows (default 200,000) through the meter's own SQL path
(`UsageMeter.record`, in batches: chained rows, one transfer of four entries each), times
`verify_ledger(full=True)` over them (it writes a checkpoint), writes `--new` more rows
(default 1,000), then times an incremental `verify_ledger` from that checkpoint and, for
comparison, a full one over everything. Prints the figures and the ratio; asserts nothing
about time. The boundary margin is 0: nothing else writes to the bench's own schema.

    .venv/bin/python bench/ledger_verify.py [--rows 200000] [--new 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import redis
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from billing import ledger  # noqa: E402
from billing.meter import UsageMeter  # noqa: E402
from billing.redis_replies import StreamEntry  # noqa: E402
from billing.verify import VerifyResult, verify_ledger  # noqa: E402
from core.db import make_engine, migrate  # noqa: E402
from core.schema import Account  # noqa: E402
from kernel.money import NANO_PER_USD as USD  # noqa: E402
from kernel.money import split_cost  # noqa: E402
from kernel.usage_event import UsageRecord  # noqa: E402

POSTGRES_URL = os.environ.get(
    "DARKGPU_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("DARKGPU_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
CUSTOMERS = 50
PROVIDERS = 5
IN, OUT = 1_000, 2_000  # nUSD per token


def setup_accounts(engine: Engine) -> list[int]:
    """Customers with credits enough for every row."""
    with Session(engine) as session, session.begin():
        accounts = [Account(email=f"bench{i}@example.com", plan="paid") for i in range(CUSTOMERS)]
        session.add_all(accounts)
        session.flush()
        ids = [a.id for a in accounts]
        for account_id in ids:
            ledger.post_transfer(
                session,
                idempotency_key=f"grant:{account_id}",
                kind="grant",
                legs=[
                    ledger.Leg(
                        ledger.PROMOTIONAL_GRANTS,
                        ledger.customer_credits(account_id),
                        1_000_000 * USD,
                    )
                ],
            )
    return ids


def write_rows(meter: UsageMeter, accounts: list[int], start: int, n: int, batch: int) -> None:
    settled_ms = int(time.time() * 1000) - 3_600_000
    for lo in range(start, start + n, batch):
        entries = []
        for i in range(lo, min(lo + batch, start + n)):
            prompt, completion = 10 + i % 7, 20 + i % 11
            cost = prompt * IN + completion * OUT
            provider_share, platform_share = split_cost(cost)
            record = UsageRecord(
                request_id=f"bench-{i}",
                account_id=accounts[i % len(accounts)],
                key_id=None,
                customer_tag=None,
                model="bench-model",
                provider_id=f"prov-{i % PROVIDERS}",
                prompt_tokens=prompt,
                completion_tokens=completion,
                input_nusd_per_token=IN,
                output_nusd_per_token=OUT,
                cost_nusd=cost,
                provider_share_nusd=provider_share,
                platform_share_nusd=platform_share,
                outcome="settled",
                usage_day="2026-12-01",
                created_at_ms=settled_ms + i - 1000,
                settled_at_ms=settled_ms + i,
            )
            entries.append(StreamEntry(f"{i}-0", record.to_stream()))
        dead = meter.record(entries)
        assert not dead, dead[:3]


def timed(engine: Engine, **kwargs: bool) -> tuple[float, VerifyResult]:
    began = time.perf_counter()
    result = verify_ledger(engine, margin_s=0, now=time.time() + 1, **kwargs)
    elapsed = time.perf_counter() - began
    assert result.ok, result.problems[:5]
    return elapsed, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--new", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=5_000)
    args = parser.parse_args()

    admin = make_engine(POSTGRES_URL)
    schema = "bench_verify_" + uuid.uuid4().hex[:12]
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in POSTGRES_URL else "?"
    engine = make_engine(f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}")
    client = redis.Redis.from_url(REDIS_URL)  # the meter's; record() does not use it
    try:
        migrate(engine)
        accounts = setup_accounts(engine)
        meter = UsageMeter(engine, client, consumer="bench-verify")
        began = time.perf_counter()
        write_rows(meter, accounts, 0, args.rows, args.batch)
        print(f"wrote {args.rows:,} usage rows in {time.perf_counter() - began:.1f} s")
        with engine.begin() as conn:
            conn.execute(
                text("ANALYZE usage_events, ledger_transfers, ledger_entries, ledger_accounts")
            )

        full_s, full = timed(engine, full=True)
        write_rows(meter, accounts, args.rows, args.new, args.batch)
        incr_s, incr = timed(engine)
        full2_s, full2 = timed(engine, full=True, write_checkpoint=False)
    finally:
        client.close()
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

    def line(name: str, seconds: float, r: VerifyResult) -> str:
        return (
            f"{name:<34} {seconds:8.3f} s   usage rows {r.usage_rows:>9,}   "
            f"transfers {r.transfers:>9,}   entries {r.entries:>9,}"
        )

    print("PostgreSQL, verify_ledger:")
    print(line(f"full ({args.rows:,} rows)", full_s, full))
    print(line(f"incremental (+{args.new:,} rows)", incr_s, incr))
    print(line(f"full ({args.rows + args.new:,} rows)", full2_s, full2))
    print(f"full / incremental: {full2_s / incr_s:.0f}x")


if __name__ == "__main__":
    main()
