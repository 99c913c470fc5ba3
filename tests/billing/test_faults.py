"""Faults with real parts: the metering process killed with SIGKILL mid-batch, a real Redis
server killed and restarted empty, and a real PostgreSQL server stopped mid-drain. Afterwards
every settled request is in the ledger exactly once and the books balance."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy.exc
from sqlalchemy import Engine, create_engine, func
from sqlalchemy import select as sql_select
from sqlalchemy.orm import Session

import billing.meter as meter_module
from billing import ledger
from billing.admission import Admission, Admitted, Refused, connect, utc_day
from billing.loop import BillingLoop
from billing.meter import UsageMeter
from billing.plans import Plans
from billing.redis_server import LocalRedis
from billing.verify import verify_ledger
from core.db import make_engine, migrate
from core.schema import UsageEvent
from kernel import redis_keys as rk
from tests.billing.conftest import MODEL, REDIS_URL, REPO, Customer, make_customer
from tests.billing.test_redis_server import free_port


async def serve(adm: Admission, c: Customer, ids: list[str], *, tag: str | None = None) -> None:
    """Admit and settle each request id (prompt 10, 5..24 completion tokens)."""
    for i, rid in enumerate(ids):
        result = await adm.admit(
            api_key=c.key,
            request_id=rid,
            model=MODEL,
            prompt_tokens=10,
            max_tokens=30,
            customer_tag=tag,
        )
        assert isinstance(result, Admitted), result
        assert await adm.settle(
            request_id=rid, prompt_tokens=10, completion_tokens=5 + i % 20, provider_id="prov"
        )


def usage_ids(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(sql_select(UsageEvent.request_id)))


def assert_books_balance(engine: Engine, r: redis.Redis, customers: list[Customer]) -> None:
    """Ledger verifies, and each Redis balance and day counter equals SQL (nothing undrained,
    no open holds)."""
    assert verify_ledger(engine).ok, verify_ledger(engine).problems
    day, _ = utc_day(time.time())
    sql_day = f"{day[:4]}-{day[4:6]}-{day[6:8]}"
    tokens = UsageEvent.prompt_tokens + UsageEvent.completion_tokens
    with Session(engine) as session:
        for c in customers:
            assert not r.exists(rk.undrained(c.account_id))
            sql_balance = ledger.balance(session, ledger.customer_credits(c.account_id))
            assert int(r.get(rk.balance(c.account_id)) or 0) == sql_balance
            used = session.scalar(
                sql_select(func.coalesce(func.sum(tokens), 0)).where(
                    UsageEvent.account_id == c.account_id, UsageEvent.usage_day == sql_day
                )
            )
            assert int(r.get(rk.day(c.account_id, day)) or 0) == used


# --- (a) the metering process killed mid-batch ---------------------------------------------

VICTIM = r"""
import sys, time
import redis
import billing.meter as meter_module
from core.db import make_engine
from billing.meter import UsageMeter

db_url, redis_url, mode, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
meter = UsageMeter(make_engine(db_url), redis.Redis.from_url(redis_url), consumer="victim")

def pause(where):
    print(where, flush=True)
    time.sleep(3600)  # the test kills this process with SIGKILL here

if mode == "mid_transaction":  # half-way through writing the second batch
    real_post, posts = meter_module._post_usage, []
    def post(session, event):
        real_post(session, event)
        posts.append(1)
        if len(posts) == batch + batch // 2:
            session.flush()
            pause("writing")
    meter_module._post_usage = post
elif mode == "after_commit":  # the second batch is committed, not yet acknowledged
    real_ack, acks = meter._ack, []
    def ack(**kwargs):
        acks.append(1)
        if len(acks) == 2:
            pause("committed")
        return real_ack(**kwargs)
    meter._ack = ack
while True:
    meter.drain_once(batch)
"""


def wait_for_line(proc: subprocess.Popen[str], timeout_s: float = 60.0) -> str:
    assert proc.stdout is not None
    ready, _w, _x = select.select([proc.stdout], [], [], timeout_s)
    assert ready, "the metering process never reached the kill point"
    return proc.stdout.readline().strip()


@pytest.mark.parametrize(
    ("mode", "signal_line", "committed_batches"),
    [("mid_transaction", "writing", 1), ("after_commit", "committed", 2)],
)
async def test_meter_killed_mid_batch(
    engine: Engine,
    r: redis.Redis,
    plans: Plans,
    admission: Admission,
    mode: str,
    signal_line: str,
    committed_batches: int,
) -> None:
    batch = 20
    a = make_customer(engine, r, plans, usd=1)
    b = make_customer(engine, r, plans, usd=1, tokens_per_day=100_000)
    ids_a = [f"a-{i}" for i in range(60)]
    ids_b = [f"b-{i}" for i in range(40)]
    await serve(admission, a, ids_a, tag="acme")
    await serve(admission, b, ids_b)

    db_url = engine.url.render_as_string(hide_password=False)
    proc = subprocess.Popen(
        [sys.executable, "-c", VICTIM, db_url, REDIS_URL, mode, str(batch)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for_line(proc) == signal_line
        # while it hangs there, SQL holds exactly the committed batches (read without
        # core.db's BEGIN IMMEDIATE, which would wait for the victim's write lock)
        reader = create_engine(engine.url)
        assert len(usage_ids(reader)) == committed_batches * batch
        reader.dispose()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    pending = r.xpending(rk.USAGE_STREAM, rk.METER_GROUP)
    assert pending["pending"] == batch  # the interrupted batch, never acknowledged
    assert {c["name"] for c in pending["consumers"]} == {b"victim"}
    assert len(usage_ids(engine)) == committed_batches * batch  # the killed writes rolled back

    rescuer = UsageMeter(engine, r, consumer="rescuer", claim_idle_ms=0)
    assert rescuer.drain_all(batch) == 100 - batch
    ids = usage_ids(engine)
    assert sorted(ids) == sorted(ids_a + ids_b)  # every request exactly once
    assert r.xpending(rk.USAGE_STREAM, rk.METER_GROUP)["pending"] == 0
    assert r.xlen(rk.USAGE_STREAM) == 0 and r.xlen(rk.DEAD_STREAM) == 0
    assert_books_balance(engine, r, [a, b])


# --- (b) Redis killed and restarted empty ----------------------------------------------------


@pytest.fixture
def volatile_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    """A private redis-server without persistence: a restart loses everything."""
    server = LocalRedis(tmp_path / "redis-data", free_port(), persistent=False)
    server.start()
    yield server
    server.stop()


async def test_redis_restarted_empty_mid_run(
    engine: Engine, plans: Plans, volatile_redis: LocalRedis
) -> None:
    r = redis.Redis.from_url(volatile_redis.url)
    ar = connect(volatile_redis.url)
    adm = Admission(ar, plans)
    loop = BillingLoop(
        engine.url.render_as_string(hide_password=False),
        volatile_redis.url,
        consumer="loop",
        block_ms=10,
    )
    try:
        capped = make_customer(engine, r, plans, usd=1, tokens_per_day=5_000)
        credits = make_customer(engine, r, plans, usd=1)
        await serve(adm, capped, [f"c-{i}" for i in range(30)], tag="acme")
        await serve(adm, credits, [f"p-{i}" for i in range(30)])
        assert loop.run(max_iterations=2) == 60
        inflight = await adm.admit(
            api_key=credits.key,
            request_id="inflight",
            model=MODEL,
            prompt_tokens=10,
            max_tokens=30,
            customer_tag=None,
        )
        assert isinstance(inflight, Admitted)
        before = {c.account_id: int(r.get(rk.balance(c.account_id))) for c in (capped, credits)}

        pid = volatile_redis.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # Redis dies; nothing was persisted
        while volatile_redis.is_running():
            time.sleep(0.05)
        down = await adm.admit(
            api_key=capped.key,
            request_id="down",
            model=MODEL,
            prompt_tokens=10,
            max_tokens=30,
            customer_tag=None,
        )
        assert isinstance(down, Refused) and (down.status, down.code) == (
            503,
            "billing_unavailable",
        )
        volatile_redis.start()
        assert r.dbsize() == 0

        cold = await adm.admit(
            api_key=capped.key,
            request_id="cold",
            model=MODEL,
            prompt_tokens=10,
            max_tokens=30,
            customer_tag=None,
        )
        assert isinstance(cold, Refused) and cold.status == 503  # until rebuilt from SQL
        loop.step()  # the billing loop notices the empty Redis and rebuilds it
        assert r.exists(rk.READY)
        # the open hold died with Redis: its balance is back and its settle bills nothing
        held = MODEL.input_nusd_per_token * 10 + MODEL.output_nusd_per_token * 30
        assert int(r.get(rk.balance(credits.account_id))) == before[credits.account_id] + held
        assert int(r.get(rk.balance(capped.account_id))) == before[capped.account_id]
        assert not await adm.settle(
            request_id="inflight", prompt_tokens=10, completion_tokens=30, provider_id="prov"
        )
        assert_books_balance(engine, r, [capped, credits])

        await serve(adm, capped, [f"c2-{i}" for i in range(30)], tag="acme")
        await serve(adm, credits, [f"p2-{i}" for i in range(30)])
        assert loop.run(max_iterations=2) == 60
        expected = [f"{p}-{i}" for p in ("c", "p", "c2", "p2") for i in range(30)]
        assert sorted(usage_ids(engine)) == sorted(expected)
        assert r.xlen(rk.DEAD_STREAM) == 0
        assert_books_balance(engine, r, [capped, credits])
    finally:
        loop.engine.dispose()
        loop.redis.close()
        await ar.aclose()
        r.close()


# --- (c) the database unavailable for a while ------------------------------------------------


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return candidates[-1].parent if candidates else None


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) that the test can stop and start.
    As root, the server runs as the `postgres` user, since PostgreSQL refuses root."""

    def __init__(self, bin_dir: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="darkgpu-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin_dir / tool), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.root} -c fsync=off"
        )
        log = str(self.root / "log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        """Immediate shutdown: connections are cut, open transactions are lost."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (pg_ctl) on this machine")
    server = PrivatePostgres(bin_dir, free_port())
    try:
        server.start()
        yield server
    finally:
        server.destroy()


async def test_database_unavailable_for_a_while(
    r: redis.Redis,
    plans: Plans,
    admission: Admission,
    private_pg: PrivatePostgres,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = make_engine(private_pg.url)
    try:
        migrate(engine)
        c = make_customer(engine, r, plans, usd=1)
        ids = [f"r-{i}" for i in range(60)]
        await serve(admission, c, ids, tag="acme")
        meter = UsageMeter(engine, r, consumer="meter")
        assert meter.drain_once(20) == 20

        # the server goes away in the middle of writing the next batch
        real_post, posts = meter_module._post_usage, []

        def post_then_lose_the_database(session: Session, event: dict) -> None:
            real_post(session, event)
            posts.append(1)
            if len(posts) == 5:
                private_pg.stop()

        monkeypatch.setattr(meter_module, "_post_usage", post_then_lose_the_database)
        with pytest.raises(sqlalchemy.exc.DBAPIError):
            meter.drain_once(20)
        monkeypatch.setattr(meter_module, "_post_usage", real_post)
        assert r.xpending(rk.USAGE_STREAM, rk.METER_GROUP)["pending"] == 20  # not acknowledged
        assert r.xlen(rk.USAGE_STREAM) == 40
        for _ in range(2):  # still down: every attempt fails and leaves the entries pending
            with pytest.raises(sqlalchemy.exc.DBAPIError):
                meter.drain_once(20)
        assert r.xpending(rk.USAGE_STREAM, rk.METER_GROUP)["pending"] == 20

        # serving goes on meanwhile: admission and settlement need only Redis
        more = [f"late-{i}" for i in range(10)]
        await serve(admission, c, more)

        private_pg.start()
        assert meter.drain_all(20) == 50
        assert sorted(usage_ids(engine)) == sorted(ids + more)
        assert r.xlen(rk.USAGE_STREAM) == 0 and r.xlen(rk.DEAD_STREAM) == 0
        assert r.xpending(rk.USAGE_STREAM, rk.METER_GROUP)["pending"] == 0
        assert_books_balance(engine, r, [c])
    finally:
        engine.dispose()
