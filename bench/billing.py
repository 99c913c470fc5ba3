"""What billing costs, measured side by side in one run against the same Redis:

1. admission and settlement round trips (one Lua script each): operations per second and
   p50/p99 latency, sequentially and with 16 concurrent callers, with each reply parser
   (`--parsers`: hiredis's C parser, redis-py's default where hiredis is installed as the
   platform installs it, and redis-py's pure-Python one), and the ratios between them; then
   open loop at each offered rate of `--rates` (pairs per second: each request admitted at its
   own moment, t0 + i / rate, whatever the earlier ones are doing, then settled), from each
   number of client processes of `--processes` (each one stands for an ingress replica and
   offers its share of the rate): latency counted from that moment, so a client that falls
   behind shows it (a closed loop of 16 callers measures only its own queue: its latency is
   16 / its throughput). Every client process freezes its startup heap as Serve does a
   replica's;
2. the usage meter: ledger rows per second flushed from the Redis stream into SQLite and
   into PostgreSQL, at batch sizes 100 and 500.

Beside each wall-clock figure, the CPU it cost: this process's CPU per operation or row, and
Redis's own time per script call (INFO commandstats: every client's calls, so give it a Redis
of its own for that column), and a local PostgreSQL server's own CPU per row flushed (every
process of it: give it a server of its own for that column). On a shared machine the wall
clock measures the neighbours too.
The pair rate is 1 / (1/admit ops/s + 1/settle ops/s).

The serving path with billing on versus off is measured by `bench/serving_overhead.py`.

It uses a Redis database of its own (default db 14; it refuses to run on a database that
holds any key) and flushes it at the end; PostgreSQL gets a schema of its own, dropped at
the end; SQLite a temporary file.

    .venv/bin/python bench/billing.py [--requests 2000] [--events 5000] [--batches 100,500]
                                      [--parsers hiredis,python] [--rates 2000,5000]
                                      [--processes 1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import psutil
import redis
from redis.asyncio import connection as aconnection
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from billing import accounts as svc  # noqa: E402
from billing.admission import Admission, Admitted, connect  # noqa: E402
from billing.meter import UsageMeter  # noqa: E402
from billing.plans import Plans, load_plans  # noqa: E402
from billing.verify import verify_ledger  # noqa: E402
from cluster.catalog import CatalogModel  # noqa: E402
from core.db import make_engine, migrate  # noqa: E402
from core.schema import UsageEvent  # noqa: E402
from core.settings import DEFAULT_PLANS_FILE  # noqa: E402
from kernel import redis_keys as rk  # noqa: E402
from kernel.money import NANO_PER_USD as USD  # noqa: E402

REDIS_URL = os.environ.get("DARKGPU_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
POSTGRES_URL = os.environ.get(
    "DARKGPU_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MODEL = CatalogModel.model_validate(
    {
        "id": "bench-model",
        "source": "local:bench",
        "input_usd_per_1m": "1",
        "output_usd_per_1m": "2",
        "min_vram_gb": 0,
        "context_length": 4096,
        "quantization": "bf16",
        "class": "local",
    }
)


@dataclass
class OpResult:
    mode: str
    op: str
    count: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    client_cpu_us: float  # this process's CPU per operation (every thread)
    server_us: float  # Redis's own time per script call (INFO commandstats), all clients


@dataclass
class FlushResult:
    database: str
    batch: int
    rows: int
    rows_per_s: float
    cpu_us: float  # the meter's own CPU per row (SQLite's work included; PostgreSQL's not)
    server_cpu_us: float | None = None  # PostgreSQL's processes' CPU per row (a local server)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def script_calls(r: redis.Redis) -> tuple[int, int]:
    """(calls, microseconds) Redis has spent in EVALSHA since its stats were last reset."""
    stats = r.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


async def timed_phase(
    name: str,
    mode: str,
    ids: list[str],
    concurrency: int,
    op: Callable[[str], Awaitable[None]],
    r: redis.Redis,
) -> OpResult:
    """CPU figures beside the wall-clock ones: on a shared machine the wall clock measures
    the neighbours too, the CPU an operation costs much less so."""
    latencies: list[float] = []
    queue = iter(ids)
    calls, usec = script_calls(r)
    cpu = time.process_time()

    async def worker() -> None:
        for rid in queue:
            started = time.perf_counter()
            await op(rid)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu
    calls_after, usec_after = script_calls(r)
    return OpResult(
        mode,
        name,
        len(ids),
        len(ids) / wall,
        pct(latencies, 0.5) * 1000,
        pct(latencies, 0.99) * 1000,
        cpu * 1e6 / len(ids),
        (usec_after - usec) / max(calls_after - calls, 1),
    )


def paid_key(r: redis.Redis, plans: Plans) -> str:
    """The API key of a paid account of its own, with $10,000 of credit and no request rate
    to speak of, as Redis holds it for admission (its SQL rows in a temporary SQLite file)."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/accounts.db")
        migrate(engine)
        account = svc.create_account(engine, r, plans, email="bench@example.com", plan="paid")
        svc.grant_credits(engine, r, account_id=account.id, amount_nusd=10_000 * USD)
        svc.set_limits(engine, r, account_id=account.id, requests_per_minute=10**9)
        key = svc.create_key(engine, r, account_id=account.id).key
        engine.dispose()
    assert key is not None
    return key


async def admit_one(adm: Admission, key: str, rid: str) -> None:
    result = await adm.admit(
        api_key=key,
        request_id=rid,
        model=MODEL,
        prompt_tokens=50,
        max_tokens=200,
        customer_tag="bench",
    )
    assert isinstance(result, Admitted), result


async def settle_one(adm: Admission, rid: str) -> None:
    assert await adm.settle(
        request_id=rid, prompt_tokens=50, completion_tokens=120, provider_id="bench"
    )


def freeze_heap() -> None:
    """As Serve does at the end of a replica's start (`RAY_SERVE_FREEZE_GC_ON_STARTUP`, on by
    default): collections skip the startup heap. Unfrozen, one took 76 ms in this bench, and
    an open loop piled up behind it."""
    gc.collect()
    gc.freeze()


@dataclass
class Share:
    admit_s: list[float]  # from each request's due moment
    settle_s: list[float]  # from its admission's return
    cpu_s: float
    ended_at: float  # wall clock


def offered_share(redis_url: str, key: str, rate: float, ids: list[str], start_at: float) -> Share:
    """One client process's share of an offered rate, open loop (a process stands for one
    ingress replica): request i is admitted at start_at + i / rate, by a task of its own started
    by a timer whether or not the earlier ones are done, then settled."""
    freeze_heap()
    return asyncio.run(_offered_share(redis_url, key, rate, ids, start_at))


async def _offered_share(
    redis_url: str, key: str, rate: float, ids: list[str], start_at: float
) -> Share:
    loop = asyncio.get_running_loop()
    client = connect(redis_url)
    adm = Admission(client, load_plans(DEFAULT_PLANS_FILE))
    share = Share([], [], 0.0, 0.0)
    tasks: set[asyncio.Task[None]] = set()

    async def pair(rid: str, due: float) -> None:
        await admit_one(adm, key, rid)
        admitted = loop.time()
        await settle_one(adm, rid)
        share.admit_s.append(admitted - due)
        share.settle_s.append(loop.time() - admitted)

    def launch(rid: str, due: float) -> None:
        task = loop.create_task(pair(rid, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        warm = iter([f"{ids[0]}-warm-{i}" for i in range(256)])  # its connections opened first

        async def warm_up() -> None:
            for rid in warm:
                await admit_one(adm, key, rid)
                await settle_one(adm, rid)

        await asyncio.gather(*(warm_up() for _ in range(16)))
        t0 = loop.time() + (start_at - time.time())
        cpu = time.process_time()
        for i, rid in enumerate(ids):
            loop.call_at(t0 + i / rate, launch, rid, t0 + i / rate)
        await asyncio.sleep(max(0.0, t0 + len(ids) / rate - loop.time()))
        while tasks:
            await asyncio.gather(*tasks)
        share.cpu_s = time.process_time() - cpu
        share.ended_at = time.time()
    finally:
        await client.aclose()
    return share


def offered_phase(
    rate: int, processes: int, key: str, requests: int, redis_url: str, r: redis.Redis
) -> list[OpResult]:
    """`requests` pairs offered at `rate` per second in all, by `processes` client processes
    at rate / processes each (interleaved: together, one every 1 / rate seconds)."""
    shares = [
        [f"bench-o{rate}x{processes}-{i}" for i in range(p, requests, processes)]
        for p in range(processes)
    ]
    calls, usec = script_calls(r)
    start_at = time.time() + 10  # the processes start, import and warm up meanwhile
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        done = list(pool.map(
            offered_share,
            [redis_url] * processes,
            [key] * processes,
            [rate / processes] * processes,
            shares,
            [start_at + p / rate for p in range(processes)],
        ))  # fmt: skip
    if max(s.ended_at for s in done) < start_at:
        raise RuntimeError("the client processes started after the offered load was due")
    wall = max(s.ended_at for s in done) - start_at
    cpu_us = sum(s.cpu_s for s in done) * 1e6 / requests / 2  # the pair's, shared evenly
    calls_after, usec_after = script_calls(r)
    redis_us = (usec_after - usec) / max(calls_after - calls, 1)  # warm-ups included
    mode = f"offered {rate:,} pairs/s, {processes} process{'es' if processes > 1 else ''}"
    return [
        OpResult(
            mode,
            op,
            requests,
            requests / wall,
            pct(latencies, 0.5) * 1000,
            pct(latencies, 0.99) * 1000,
            cpu_us,
            redis_us,
        )
        for op, latencies in (
            ("admit", [x for s in done for x in s.admit_s]),
            ("settle", [x for s in done for x in s.settle_s]),
        )
    ]


# redis-py's reply parsers for the asyncio client (private names: this bench only)
PARSERS = {"hiredis": aconnection._AsyncHiredisParser, "python": aconnection._AsyncRESP3Parser}


async def bench_admission(
    r: redis.Redis,
    redis_url: str,
    requests: int,
    parsers: list[str],
    rates: list[int],
    processes: list[int],
) -> list[OpResult]:
    plans = load_plans(DEFAULT_PLANS_FILE)
    key = paid_key(r, plans)
    clients = {name: connect(redis_url, parser_class=PARSERS[name]) for name in parsers}
    freeze_heap()
    results = []
    try:
        for mode, concurrency in (("sequential", 1), ("concurrency 16", 16)):
            for name, client in clients.items():  # each parser in turn, same phase
                adm = Admission(client, plans)
                label = f"{mode}, {name}"
                ids = [f"bench-{mode[0]}-{name}-{i}" for i in range(requests)]
                admit, settle = partial(admit_one, adm, key), partial(settle_one, adm)
                results.append(await timed_phase("admit", label, ids, concurrency, admit, r))
                results.append(await timed_phase("settle", label, ids, concurrency, settle, r))
    finally:
        for client in clients.values():
            await client.aclose()
    for rate in rates:
        for n in processes:
            results += offered_phase(rate, n, key, requests, redis_url, r)
    return results


def event_template(r: redis.Redis) -> dict[bytes, bytes]:
    """One real usage event, as the settlement script wrote it to the stream."""
    entries = r.xrange(rk.USAGE_STREAM, count=1)
    if not entries:
        raise RuntimeError("no usage event in the stream to copy")
    return dict(entries[0][1])


def bench_flush(
    r: redis.Redis,
    engine: Engine,
    label: str,
    template: dict[bytes, bytes],
    events: int,
    batch: int,
) -> FlushResult:
    account = svc.create_account(
        engine, None, load_plans(DEFAULT_PLANS_FILE), email=f"{uuid.uuid4().hex}@x.io", plan="paid"
    )
    svc.grant_credits(engine, None, account_id=account.id, amount_nusd=10_000 * USD)
    key = svc.create_key(engine, None, account_id=account.id)
    r.delete(rk.USAGE_STREAM, rk.DEAD_STREAM)
    tag = uuid.uuid4().hex[:8]
    pipe = r.pipeline(transaction=False)
    for i in range(events):
        fields = {
            **template,
            b"request_id": f"flush-{tag}-{i}".encode(),
            b"account_id": str(account.id).encode(),
            b"key_id": str(key.id).encode(),
        }
        pipe.xadd(rk.USAGE_STREAM, fields)
    pipe.execute()
    meter = UsageMeter(engine, r, consumer=f"bench-{tag}")
    meter.ensure_group()
    postgres = label == "PostgreSQL"
    server = postgres_cpu() if postgres else {}
    started, cpu = time.perf_counter(), time.process_time()
    handled = meter.drain_all(batch)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    after = postgres_cpu() if postgres else {}
    server_s = sum(t - server.get(pid, 0.0) for pid, t in after.items())
    with Session(engine) as session:
        rows = session.scalar(
            select(func.count()).where(UsageEvent.request_id.like(f"flush-{tag}-%"))
        )
    if handled != events or rows != events or r.xlen(rk.DEAD_STREAM):
        raise RuntimeError(f"{label}: drained {handled}, recorded {rows} of {events}")
    server_us = server_s * 1e6 / events if postgres and after else None
    return FlushResult(label, batch, events, events / wall, cpu * 1e6 / events, server_us)


def postgres_cpu() -> dict[int, float]:
    """CPU seconds so far of each process of the PostgreSQL server on this machine (its
    backends, WAL writer, checkpointer: a remote server's shows nothing here)."""
    seconds = {}
    for proc in psutil.process_iter(["name", "cpu_times"]):
        times = proc.info["cpu_times"]
        if proc.info["name"] in ("postgres", "postmaster") and times is not None:
            seconds[proc.pid] = times.user + times.system
    return seconds


def postgres_engine() -> tuple[Engine, Engine, str] | None:
    admin = make_engine(POSTGRES_URL)
    schema = "bench_" + uuid.uuid4().hex[:12]
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:  # no PostgreSQL here: the table says so
        print(f"PostgreSQL unavailable ({type(exc).__name__}); skipping it", file=sys.stderr)
        admin.dispose()
        return None
    sep = "&" if "?" in POSTGRES_URL else "?"
    engine = make_engine(f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}")
    migrate(engine)
    return admin, engine, schema


def bench_flushes(
    r: redis.Redis, template: dict[bytes, bytes], events: int, batches: list[int]
) -> list[FlushResult]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            engine = make_engine(f"sqlite:///{tmp}/ledger-{batch}.db")
            migrate(engine)
            results.append(bench_flush(r, engine, "SQLite", template, events, batch))
            assert verify_ledger(engine).ok
            engine.dispose()
    for batch in batches:
        pg = postgres_engine()
        if pg is None:
            break
        admin, engine, schema = pg
        try:
            results.append(bench_flush(r, engine, "PostgreSQL", template, events, batch))
            assert verify_ledger(engine).ok
        finally:
            engine.dispose()
            with admin.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            admin.dispose()
    return results


def print_tables(ops: list[OpResult], flushes: list[FlushResult], redis_url: str) -> None:
    print(f"\n### Admission and settlement (Redis {redis_url})\n")
    print("| mode | operation | count | ops/s | p50 ms | p99 ms | client CPU µs/op | Redis µs/op |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for o in ops:
        print(
            f"| {o.mode} | {o.op} | {o.count} | {o.ops_per_s:,.0f} | "
            f"{o.p50_ms:.3f} | {o.p99_ms:.3f} | {o.client_cpu_us:.0f} | {o.server_us:.1f} |"
        )
    pairs = [o for o in ops if o.op in ("admit", "settle")]
    rates = {}
    for mode in dict.fromkeys(o.mode for o in pairs):
        admit, settle = (o for o in pairs if o.mode == mode)
        if mode.startswith("offered"):  # both at the rate the pairs were served
            print(f"\n{mode}: served {admit.ops_per_s:,.0f} pairs/s, p99 admit "
                  f"{admit.p99_ms:.3f} ms, settle {settle.p99_ms:.3f} ms")  # fmt: skip
            continue
        rates[mode] = 1 / (1 / admit.ops_per_s + 1 / settle.ops_per_s)
        cpu = admit.client_cpu_us + settle.client_cpu_us
        print(f"\n{mode}: {rates[mode]:,.0f} admission + settlement pairs/s, "
              f"client CPU {cpu:.0f} µs per pair")  # fmt: skip
    for mode in ("sequential", "concurrency 16"):
        if f"{mode}, hiredis" in rates and f"{mode}, python" in rates:
            ratio = rates[f"{mode}, hiredis"] / rates[f"{mode}, python"]
            print(f"{mode}: hiredis / python pairs/s = {ratio:.2f}x")
    print("\n### Usage meter: ledger rows flushed from the stream into SQL\n")
    print("| database | batch | rows | rows/s | meter CPU µs/row | server CPU µs/row |")
    print("|---|---:|---:|---:|---:|---:|")
    for f in flushes:
        server = "" if f.server_cpu_us is None else f"{f.server_cpu_us:.0f}"
        print(f"| {f.database} | {f.batch} | {f.rows} | {f.rows_per_s:,.0f} | {f.cpu_us:.0f} "
              f"| {server} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--batches", default="100,500")
    parser.add_argument("--parsers", default="hiredis,python", help="of: hiredis, python")
    parser.add_argument("--rates", default="2000,5000", help="offered pairs/s, open loop")
    parser.add_argument("--processes", default="1,2", help="client processes offering a rate")
    args = parser.parse_args()
    parsers = args.parsers.split(",")
    if not set(parsers) <= set(PARSERS):
        sys.exit(f"--parsers: choose among {', '.join(PARSERS)}")
    batches = [int(b) for b in args.batches.split(",")]

    r = redis.Redis.from_url(args.redis_url)
    if r.dbsize():
        sys.exit(f"{args.redis_url} holds keys; the benchmark needs an empty Redis database")
    try:
        rates = [int(x) for x in args.rates.split(",") if x]
        processes = [int(x) for x in args.processes.split(",")]
        ops = asyncio.run(
            bench_admission(r, args.redis_url, args.requests, parsers, rates, processes)
        )
        template = event_template(r)
        flushes = bench_flushes(r, template, args.events, batches)
    finally:
        r.flushdb()
        r.close()
    print_tables(ops, flushes, args.redis_url)


if __name__ == "__main__":
    main()
