"""Database engines and migrations.

`make_engine(url)` returns an Engine for SQLite (default) or PostgreSQL (its sessions without
JIT compilation: `_postgres_setup`). On SQLite every transaction starts with `BEGIN
IMMEDIATE` (a writer lock at the start, so two writers never read the same ledger balance or
chain head and then both write), in WAL mode with foreign keys on and a busy timeout. On
PostgreSQL, writers lock rows (`SELECT … FOR UPDATE`) and the usage chain head (an advisory
lock) instead; see billing.ledger and billing.meter.

`migrate(url)` upgrades the database to the newest Alembic revision; the Alembic scripts live
in `core/migrations` and need no `alembic.ini`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str, **kwargs: Any) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {}).setdefault("timeout", 30)
        engine = create_engine(parsed, **kwargs)
        _sqlite_setup(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    engine = create_engine(parsed, **kwargs)
    _postgres_setup(engine)
    return engine


def _postgres_setup(engine: Engine) -> None:
    """PostgreSQL's JIT compilation and parallel workers off for the platform's sessions.
    Both pay once the planner's cost estimate passes a threshold (`jit_above_cost`,
    `parallel_setup_cost`): worth it for an analytical scan, a loss for the short indexed reads
    the platform makes, whose estimates can pass them when the table's statistics are skewed.
    bench/history.py, 10 million usage rows, the payout due for a week (a plan that read 1,166
    rows): 70 ms of 87 were compiling it; then, with JIT off, 6.5 ms of which 0.8 ms were the
    work of each of three processes and the rest starting two workers and gathering them."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("SET jit = off")
            cur.execute("SET max_parallel_workers_per_gather = 0")
        dbapi_conn.commit()


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        if engine.url.database not in (None, "", ":memory:"):
            cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def migrate(url_or_engine: str | Engine, revision: str = "head") -> None:
    """Upgrade the database to `revision` (default: the newest)."""
    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    if isinstance(url_or_engine, str):
        engine.dispose()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
