"""What billing's reads cost as the usage history grows (issue 13, "cost flat in history"):
the same questions timed, side by side in one run, against PostgreSQL histories of several
sizes (default 10,000 and 10,000,000 usage rows), with the ratio big / small of each.

Each size gets a PostgreSQL schema of its own, migrated with the project's migrations
(core.db.migrate), then filled in bulk by the server itself (`INSERT … SELECT` over
`generate_series`, the usage table's and the ledger's indexes and foreign keys dropped during
the load and made again from their own definitions afterwards, as a restore does), then
ANALYZEd:

- 10,000 accounts (one API key each), 50 providers, 6 models, 17 customer tags (and none);
- the *history*: size − 5,000 usage rows spread evenly over the 365 days before the last 30
  days, over every account, with their ledger transfers and entries as the meter writes them
  (`usage:<request_id>`: customer credits → 95 % provider payable, 5 % platform revenue);
- the *present*: the same 5,000 usage rows at every size, over the 30 days before today
  (UTC), one in ten of them account 1's (so account 1's month is the same at every size,
  its history not);
- one grant per account, so that each customer's balance ends at the same $1,000 at every
  size (the ledger accounts' balances and versions are the sums of their entries).

The usage rows' hash chain is not a valid chain (`prev_hash` / `row_hash` are unique
stand-ins) and the entries' `balance_after` / `account_version` are not running values: no
function measured here reads them. The ledger's verification (`admin ledger verify`, the
reconciliation's `double_entry` check) reads every row by design; it is made incremental
elsewhere (billing.verify) and left out of the reconciliation timed here (stubbed).

Timed at each size (the median of `--reps` runs, the sizes taking turns):

- admission + settlement: one pair of Redis round trips (billing.admission, as
  bench/billing.py does it, on an account of its own in a Redis database emptied after);
  it never reads SQL, so it is measured once per size only to show it;
- `/v1/usage` for account 1's 30 days, grouped by day, by model and by customer
  (billing.reports.usage_report, what serve_app/ingress.py's `usage` calls);
- the console's usage page for the same 30 days: the data it renders
  (serve_app/console/account_routes.py `usage_page`: usage_report by day, model and customer
  tag, and the first page of reports.usage_events), called directly, not through HTTP;
- the console's keys page data (billing.key_usage.keys_with_usage, 30 days);
- `/v1/credits` (billing.reports.credits_summary) for account 1;
- a day's reconciliation (billing.reconcile.reconcile for yesterday, UTC), with Redis
  rebuilt from SQL first (billing.rebuild, as of that day) so its Redis checks run; Stripe's
  part is SQL only (stripe_movements against the clearing entries); `double_entry` stubbed;
- a provider's earnings for a week (billing.earnings.earnings, the console's and the
  statements' query) and what its payout for that week may pay (earnings.due_for_week).

`--explain` prints EXPLAIN (ANALYZE, BUFFERS) of each SQL statement of each figure at the
largest size. `--keep` leaves the schemas (their names are printed) and `--reuse
SIZE=SCHEMA,…` measures such schemas again without building them (after migrating them to
the newest revision, then ANALYZE). Redis: its own database (default db 13; it refuses one
that holds any key), flushed at the end.

    .venv/bin/python bench/history.py [--sizes 10000,10000000] [--reps 7] [--explain]
                                      [--keep] [--reuse 10000=bench_…,10000000=bench_…]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Connection, Engine, event, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.billing import admit_one, paid_key, settle_one  # noqa: E402
from billing import earnings, key_usage, rebuild, reconcile, reports  # noqa: E402
from billing.admission import Admission, connect  # noqa: E402
from billing.plans import Plans, load_plans  # noqa: E402
from core.db import make_engine, migrate  # noqa: E402
from core.settings import DEFAULT_PLANS_FILE  # noqa: E402
from kernel.money import NANO_PER_USD as USD  # noqa: E402

REDIS_URL = os.environ.get("DARKGPU_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
POSTGRES_URL = os.environ.get(
    "DARKGPU_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
ACCOUNTS = 10_000
PROVIDERS = 50
PRESENT = 5_000  # usage rows of the last 30 days, the same at every size
PROBE = 1  # the account whose month is read: one in ten present rows
BALANCE = 1_000 * USD  # every customer's balance once built
CHUNK = 1_000_000  # rows per INSERT … SELECT
BULK_TABLES = ("usage_events", "ledger_transfers", "ledger_entries")


@dataclass(frozen=True)
class Clock:
    """The bench's calendar: today 00:00 UTC, the present's 30 days before it, the
    history's 365 days before those."""

    today: date

    @property
    def present_start(self) -> datetime:
        return datetime.combine(self.today - timedelta(days=30), datetime.min.time(), UTC)

    @property
    def present_end(self) -> datetime:
        return datetime.combine(self.today, datetime.min.time(), UTC)

    @property
    def history_start(self) -> datetime:
        return self.present_start - timedelta(days=365)

    @property
    def day(self) -> date:  # the reconciled day
        return self.today - timedelta(days=1)

    @property
    def day_noon(self) -> float:
        return datetime.combine(self.day, datetime.min.time(), UTC).timestamp() + 43_200


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


# --- building a history ----------------------------------------------------------------------

# One usage row per id; everything but its account and time follows from its id. Prices:
# $1 / $2 per million tokens (1,000 / 2,000 nUSD a token); the split is kernel.money's.
USAGE_INSERT = """
INSERT INTO usage_events (id, request_id, account_id, key_id, customer_tag, model, provider_id,
    prompt_tokens, completion_tokens, reported_completion_tokens, input_nusd_per_token,
    output_nusd_per_token, cost_nusd, provider_share_nusd, platform_share_nusd, outcome,
    usage_day, created_at_ms, settled_at_ms, prev_hash, row_hash)
SELECT id, 'bench-' || id, acct, acct,
    CASE WHEN id % 5 = 0 THEN NULL ELSE 'cust-' || (id % 17) END,
    'model-' || (id % 6), 'prv_bench_' || lpad((id % {providers})::text, 2, '0'),
    p, c, c, 1000, 2000, cost, cost * 95 / 100, cost - cost * 95 / 100, 'settled',
    to_char(to_timestamp(at / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD'), at,
    at + 800 + id % 4000, md5('p' || id) || md5('q' || id), md5('r' || id) || md5('s' || id)
FROM (
    SELECT id, acct, p, c, p * 1000 + c * 2000 AS cost, at FROM (
        SELECT g + :id0 AS id,
            {account} AS acct,
            50 + (g * 31) % 500 AS p,
            20 + (g * 17) % 700 AS c,
            :start_ms + (g - 1) * :span_ms / :count AS at
        FROM generate_series(CAST(:g0 AS bigint), CAST(:g1 AS bigint)) AS g
    ) AS s
) AS t
"""
HISTORY_ACCOUNT = f"(g * 7919) % {ACCOUNTS} + 1"
PRESENT_ACCOUNT = f"CASE WHEN g % 10 = 0 THEN {PROBE} ELSE (g * 7919) % {ACCOUNTS} + 1 END"

# ledger account ids: customers 1..ACCOUNTS, providers next, then revenue and grants
PROVIDER0 = ACCOUNTS + 1
REVENUE = ACCOUNTS + PROVIDERS + 1
GRANTS = ACCOUNTS + PROVIDERS + 2

TRANSFER_INSERT = """
INSERT INTO ledger_transfers (id, idempotency_key, kind, memo, event_at, created_at)
SELECT id, 'usage:' || request_id, 'usage',
    model || ' ' || prompt_tokens || '+' || completion_tokens || ' tokens',
    to_timestamp(settled_at_ms / 1000.0), to_timestamp(settled_at_ms / 1000.0)
FROM usage_events WHERE id BETWEEN :a AND :b
"""
# the meter's legs in its order: credits → provider payable, credits → platform revenue
ENTRY_INSERT = f"""
INSERT INTO ledger_entries (id, transfer_id, ledger_account_id, amount, balance_after,
    account_version)
SELECT (u.id - 1) * 4 + leg + 1, u.id,
    CASE leg WHEN 0 THEN u.account_id WHEN 1 THEN {PROVIDER0} + u.id % {PROVIDERS}
        WHEN 2 THEN u.account_id ELSE {REVENUE} END,
    CASE leg WHEN 0 THEN -u.provider_share_nusd WHEN 1 THEN u.provider_share_nusd
        WHEN 2 THEN -u.platform_share_nusd ELSE u.platform_share_nusd END,
    0, 0
FROM usage_events u CROSS JOIN generate_series(0, 3) AS leg WHERE u.id BETWEEN :a AND :b
"""


def say(*parts: Any) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def schema_engine(schema: str) -> Engine:
    sep = "&" if "?" in POSTGRES_URL else "?"
    return make_engine(f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}")


def drop_bulk_constraints(conn: Connection) -> list[str]:
    """Drop the bulk tables' keys, unique constraints, foreign keys and indexes; returns the
    statements that make them again (their own definitions), in a valid order."""
    tables = ", ".join(f"'{t}'" for t in BULK_TABLES)
    constraints = conn.execute(
        text(
            "SELECT c.conrelid::regclass::text, c.conname, c.contype, pg_get_constraintdef(c.oid) "
            "FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
            f"WHERE t.relnamespace = current_schema()::regnamespace AND t.relname IN ({tables}) "
            "AND c.contype IN ('p', 'u', 'f')"
        )
    ).all()
    names = {name for _t, name, _k, _d in constraints}
    indexes = [
        (name, definition)
        for name, definition in conn.execute(
            text(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
                f"AND tablename IN ({tables})"
            )
        )
        if name not in names
    ]
    keys = [c for c in constraints if c[2] != "f"]
    foreign = [c for c in constraints if c[2] == "f"]
    for table, name, _kind, _definition in foreign + keys:
        conn.execute(text(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'))
    for name, _definition in indexes:
        conn.execute(text(f'DROP INDEX "{name}"'))
    return (
        [f'ALTER TABLE {t} ADD CONSTRAINT "{n}" {d}' for t, n, _k, d in keys]
        + [definition for _name, definition in indexes]
        + [f'ALTER TABLE {t} ADD CONSTRAINT "{n}" {d}' for t, n, _k, d in foreign]
    )


def build(engine: Engine, size: int, clock: Clock) -> float:
    """Fill a freshly migrated schema with a history of `size` usage rows; returns seconds."""
    started = time.perf_counter()
    history = size - PRESENT
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL synchronous_commit = off"))
        conn.execute(
            text(
                "INSERT INTO accounts (id, email, plan, status, created_at, operator) "
                "SELECT a, 'bench' || a || '@example.com', 'paid', 'active', :t, false "
                "FROM generate_series(1, CAST(:n AS bigint)) AS a"
            ),
            {"n": ACCOUNTS, "t": clock.history_start},
        )
        conn.execute(
            text(
                "INSERT INTO api_keys (id, account_id, key_hash, prefix, name, created_at) "
                "SELECT a, a, md5('k' || a) || md5('l' || a), 'dgp-bench' || a, 'bench', :t "
                "FROM generate_series(1, CAST(:n AS bigint)) AS a"
            ),
            {"n": ACCOUNTS, "t": clock.history_start},
        )
        conn.execute(
            text(
                "INSERT INTO ledger_accounts (id, name, kind, account_id, provider_id, balance, "
                "version, allow_negative, created_at) "
                "SELECT a, 'customer:' || a || '\\:credits', 'customer_credits', a, NULL, 0, 0, "
                "false, :t FROM generate_series(1, CAST(:n AS bigint)) AS a"
            ),
            {"n": ACCOUNTS, "t": clock.history_start},
        )
        conn.execute(
            text(
                "INSERT INTO ledger_accounts (id, name, kind, account_id, provider_id, balance, "
                "version, allow_negative, created_at) "
                "SELECT :p0 + p, 'provider:' || pid || '\\:payable', 'provider_payable', NULL, "
                "pid, 0, 0, false, :t FROM (SELECT p, 'prv_bench_' || lpad(p::text, 2, '0') "
                "AS pid FROM generate_series(0, CAST(:n AS bigint) - 1) AS p) AS s"
            ),
            {"n": PROVIDERS, "p0": PROVIDER0, "t": clock.history_start},
        )
        conn.execute(
            text(
                "INSERT INTO ledger_accounts (id, name, kind, balance, version, allow_negative, "
                "created_at) VALUES (:r, 'platform\\:revenue', 'platform_revenue', 0, 0, false, "
                ":t), (:g, 'platform\\:promotional_grants', 'promotional_grants', 0, 0, true, :t)"
            ),
            {"r": REVENUE, "g": GRANTS, "t": clock.history_start},
        )
        conn.execute(
            text(
                "INSERT INTO account_limits (account_id, requests_per_minute, updated_at) "
                "VALUES (:a, 1000000000, :t)"
            ),
            {"a": PROBE, "t": now},
        )
        recreate = drop_bulk_constraints(conn)
    parts = [
        (HISTORY_ACCOUNT, 0, history, ms(clock.history_start), ms(clock.present_start)),
        (PRESENT_ACCOUNT, history, PRESENT, ms(clock.present_start), ms(clock.present_end)),
    ]
    for account, id0, count, start_ms, end_ms in parts:
        for g0 in range(1, count + 1, CHUNK):
            g1 = min(g0 + CHUNK - 1, count)
            with engine.begin() as conn:
                conn.execute(text("SET LOCAL synchronous_commit = off"))
                sql = USAGE_INSERT.format(providers=PROVIDERS, account=account)
                params = {"id0": id0, "g0": g0, "g1": g1, "start_ms": start_ms,
                          "span_ms": end_ms - start_ms, "count": count}  # fmt: skip
                conn.execute(text(sql), params)
                bounds = {"a": id0 + g0, "b": id0 + g1}
                conn.execute(text(TRANSFER_INSERT), bounds)
                conn.execute(text(ENTRY_INSERT), bounds)
            say(f"size {size:,}: usage rows {id0 + g1:,} of {size:,}")
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL synchronous_commit = off"))
        # one grant per account: whatever makes its balance end at BALANCE
        grant_at = clock.history_start - timedelta(days=1)
        conn.execute(
            text(
                "CREATE TEMP TABLE spent ON COMMIT DROP AS SELECT a AS account_id, "
                "coalesce(s.cost, 0) AS cost FROM generate_series(1, CAST(:n AS bigint)) AS a "
                "LEFT JOIN (SELECT account_id, sum(cost_nusd) AS cost FROM usage_events "
                "GROUP BY account_id) AS s ON s.account_id = a"
            ),
            {"n": ACCOUNTS},
        )
        conn.execute(
            text(
                "INSERT INTO ledger_transfers (id, idempotency_key, kind, memo, event_at, "
                "created_at) SELECT :t0 + account_id, 'grant\\:bench:' || account_id, "
                "'signup_grant', 'bench', :at, :at FROM spent"
            ),
            {"t0": size, "at": grant_at},
        )
        conn.execute(
            text(
                "INSERT INTO ledger_entries (id, transfer_id, ledger_account_id, amount, "
                "balance_after, account_version) "
                "SELECT :e0 + (account_id - 1) * 2 + leg + 1, :t0 + account_id, "
                "CASE leg WHEN 0 THEN :g ELSE account_id END, "
                "CASE leg WHEN 0 THEN -1 ELSE 1 END * (:b + cost), 0, 0 "
                "FROM spent CROSS JOIN generate_series(0, 1) AS leg"
            ),
            {"e0": size * 4, "t0": size, "g": GRANTS, "b": BALANCE},
        )
    say(f"size {size:,}: rows in, {time.perf_counter() - started:.0f} s; indexes and keys")
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL maintenance_work_mem = '1GB'"))
        for statement in recreate:
            conn.execute(text(statement))
        conn.execute(
            text(
                "UPDATE ledger_accounts a SET balance = s.total, version = s.n FROM "
                "(SELECT ledger_account_id, sum(amount) AS total, count(*) AS n "
                "FROM ledger_entries GROUP BY ledger_account_id) AS s "
                "WHERE s.ledger_account_id = a.id"
            )
        )
        for table in ("accounts", "api_keys", "ledger_accounts", *BULK_TABLES):
            conn.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))"
                )
            )
    analyze(engine)
    return time.perf_counter() - started


def analyze(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))


# --- what is timed ---------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    seconds: dict[int, list[float]] = field(default_factory=dict)

    def median_ms(self, size: int) -> float:
        return statistics.median(self.seconds[size]) * 1000


Measured = Callable[[Engine], object]


def measured(clock: Clock, r: redis.Redis, plans: Plans, provider: str) -> dict[str, Measured]:
    start, end = clock.present_start, clock.present_end
    week_end = datetime.combine(clock.today, datetime.min.time(), UTC)

    def v1_usage(engine: Engine) -> object:
        return [
            reports.usage_report(engine, start=start, end=end, group_by=g, account_id=PROBE)
            for g in ("day", "model", "customer")
        ]

    def console_usage(engine: Engine) -> object:
        chosen = reports.UsageFilter(start, end, account_id=PROBE)
        return v1_usage(engine), reports.usage_events(engine, chosen, offset=0, limit=50)

    def console_keys(engine: Engine) -> object:
        return key_usage.keys_with_usage(engine, account_id=PROBE, start=start, end=end)

    def credits(engine: Engine) -> object:
        return reports.credits_summary(engine, r, plans, PROBE, now=clock.day_noon)

    def reconciliation(engine: Engine) -> object:
        report = reconcile.reconcile(engine, r, day=clock.day, now=clock.day_noon)
        if not report.ok:
            raise RuntimeError(f"reconciliation not ok: {report.to_json()}")
        return report

    def provider_week(engine: Engine) -> object:
        return earnings.earnings(
            engine, [provider], start=clock.day - timedelta(days=6), end=clock.today
        )

    def payout_due(engine: Engine) -> object:
        from sqlalchemy.orm import Session

        with Session(engine) as session:
            return earnings.due_for_week(session, provider, week_end - timedelta(days=7))

    return {
        "/v1/usage, account-month (3 groupings)": v1_usage,
        "console usage page data": console_usage,
        "console keys page data": console_keys,
        "/v1/credits (credits_summary)": credits,
        "reconciliation of a day (no double_entry)": reconciliation,
        "provider earnings, a week": provider_week,
        "provider payout due for a week": payout_due,
    }


async def admission_pairs(redis_url: str, pairs: int) -> list[float]:
    """Seconds per admission + settlement pair, sequential, on an account of its own (as
    bench/billing.py admits and settles)."""
    plans = load_plans(DEFAULT_PLANS_FILE)
    r = redis.Redis.from_url(redis_url)
    key = paid_key(r, plans)
    client = connect(redis_url)
    adm = Admission(client, plans)
    times = []
    try:
        for i in range(pairs):
            rid = f"hist-{uuid.uuid4().hex[:8]}-{i}"
            started = time.perf_counter()
            await admit_one(adm, key, rid)
            await settle_one(adm, rid)
            times.append(time.perf_counter() - started)
    finally:
        await client.aclose()
        r.flushdb()
        r.close()
    return times


def explain(engine: Engine, name: str, run: Measured) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of each statement `run` sends."""
    seen: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, parameters: Any, *_a: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        run(engine)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    print(f"\n#### EXPLAIN: {name}\n")
    with engine.connect() as conn:
        for statement, parameters in seen:
            plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
            print("```\n" + " ".join(statement.split())[:600] + "\n--")
            print("\n".join(row[0] for row in plan) + "\n```")


# --- the run ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", help="default 10000,10000000, or none with --reuse")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--pairs", type=int, default=500, help="admission pairs per size")
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--keep", action="store_true", help="leave the schemas")
    parser.add_argument("--reuse", default="", help="SIZE=SCHEMA,… built by an earlier --keep")
    args = parser.parse_args()
    default = "" if args.reuse else "10000,10000000"
    sizes = [int(s) for s in (args.sizes or default).split(",") if s]
    reuse = dict(
        (int(s), name) for s, name in (pair.split("=") for pair in args.reuse.split(",") if pair)
    )
    sizes = sorted(set(sizes) | set(reuse))
    if min(sizes) <= PRESENT:
        sys.exit(f"--sizes: each size must exceed the {PRESENT:,} rows of the present")
    r = redis.Redis.from_url(args.redis_url)
    if r.dbsize():
        sys.exit(f"{args.redis_url} holds keys; the benchmark needs an empty Redis database")
    clock = Clock(datetime.now(UTC).date())
    plans = load_plans(DEFAULT_PLANS_FILE)
    admin = make_engine(POSTGRES_URL)
    schemas: dict[int, str] = {}
    engines: dict[int, Engine] = {}
    builds: dict[int, float] = {}
    try:
        for size in sizes:
            if size in reuse:
                schemas[size] = reuse[size]
                engines[size] = schema_engine(reuse[size])
                migrate(engines[size])
                analyze(engines[size])
                continue
            schemas[size] = f"bench_history_{size}_{uuid.uuid4().hex[:8]}"
            with admin.begin() as conn:
                conn.execute(text(f"CREATE SCHEMA {schemas[size]}"))
            engines[size] = schema_engine(schemas[size])
            migrate(engines[size])
            builds[size] = build(engines[size], size, clock)
            say(f"size {size:,}: built in {builds[size]:.0f} s ({schemas[size]})")

        admission = Figure("admission + settlement pair (Redis)")
        for size in sizes:
            admission.seconds[size] = asyncio.run(admission_pairs(args.redis_url, args.pairs))
        # Redis as of the reconciled day, from SQL: the same at every size by construction
        rebuild.rebuild(engines[sizes[0]], r, now=clock.day_noon)
        figures = [admission]
        runs = measured(clock, r, plans, "prv_bench_07")
        original = reconcile._check_double_entry
        reconcile._check_double_entry = lambda engine: reconcile.Check("double_entry")  # type: ignore[assignment]
        try:
            for name, run in runs.items():
                figure = Figure(name, {size: [] for size in sizes})
                for size in sizes:  # warm: first call pays for connections and caches
                    run(engines[size])
                for _ in range(args.reps):
                    for size in sizes:
                        started = time.perf_counter()
                        run(engines[size])
                        figure.seconds[size].append(time.perf_counter() - started)
                figures.append(figure)
            if args.explain:
                for name, run in runs.items():
                    explain(engines[sizes[-1]], f"{name} at {sizes[-1]:,} rows", run)
        finally:
            reconcile._check_double_entry = original  # type: ignore[method-assign]
        print_table(figures, sizes, builds, args.reps, args.pairs)
    finally:
        for engine in engines.values():
            engine.dispose()
        if not args.keep:
            for size, schema in schemas.items():
                if size not in reuse:
                    with admin.begin() as conn:
                        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        else:
            say("kept: --reuse " + ",".join(f"{s}={n}" for s, n in schemas.items()))
        admin.dispose()
        r.flushdb()
        r.close()


def print_table(
    figures: list[Figure], sizes: list[int], builds: dict[int, float], reps: int, pairs: int
) -> None:
    small, big = sizes[0], sizes[-1]
    print(f"\n### Billing's reads against usage histories of {', '.join(f'{s:,}' for s in sizes)}"
          " rows (PostgreSQL)\n")  # fmt: skip
    for size, seconds in builds.items():
        print(f"- built {size:,} usage rows (+ ledger) in {seconds:,.0f} s")
    print(f"- median ms of {reps} runs (admission: of {pairs} sequential pairs)\n")
    print("| figure | " + " | ".join(f"{s:,} rows" for s in sizes) + f" | {big:,} / {small:,} |")
    print("|---|" + "---:|" * (len(sizes) + 1))
    for f in figures:
        cells = " | ".join(f"{f.median_ms(s):.2f}" for s in sizes)
        print(f"| {f.name} | {cells} | {f.median_ms(big) / f.median_ms(small):.2f}x |")


if __name__ == "__main__":
    main()
