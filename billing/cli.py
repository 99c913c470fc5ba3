"""`darkgpu admin …`: accounts, keys, credits, caps, the ledger and usage (Typer).

Configuration comes from `DARKGPU_*` variables (core.settings). Every command upgrades the
database schema first if needed. SQL is written first; if Redis cannot be updated afterwards
the command says so and exits 2 (`admin redis rebuild` repairs Redis from SQL).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

import redis
import typer
from sqlalchemy import Engine

from billing import accounts as svc
from billing import flags, reports, verify
from billing.plans import Plans, load_plans
from core.db import make_engine, migrate
from core.settings import Settings
from kernel.errors import DarkGpuError
from kernel.money import usd_to_nusd

app = typer.Typer(
    name="admin",
    help="Operate billing: accounts, keys, credits, caps, ledger.",
    no_args_is_help=True,
)
account_app = typer.Typer(help="Accounts.", no_args_is_help=True)
key_app = typer.Typer(help="API keys.", no_args_is_help=True)
credits_app = typer.Typer(help="Prepaid credits.", no_args_is_help=True)
cap_app = typer.Typer(help="Daily token caps.", no_args_is_help=True)
ledger_app = typer.Typer(help="The ledgers.", no_args_is_help=True)
usage_app = typer.Typer(help="Usage reports.", no_args_is_help=True)
redis_app = typer.Typer(help="The Redis copy of billing state.", no_args_is_help=True)
db_app = typer.Typer(help="The SQL database.", no_args_is_help=True)
for sub, name in (
    (account_app, "account"),
    (key_app, "key"),
    (credits_app, "credits"),
    (cap_app, "cap"),
    (ledger_app, "ledger"),
    (usage_app, "usage"),
    (redis_app, "redis"),
    (db_app, "db"),
):
    app.add_typer(sub, name=name)

T = TypeVar("T")


@dataclass
class Ctx:
    settings: Settings
    engine: Engine
    state: redis.Redis  # console sessions, throttles: what is not money
    redis: redis.Redis  # money
    plans: Plans


@contextmanager
def _ctx() -> Iterator[Ctx]:
    settings = Settings()
    engine = make_engine(settings.database_url)
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3)
    state = redis.Redis.from_url(settings.state_redis_url, socket_connect_timeout=3)
    try:
        migrate(engine)
        yield Ctx(settings, engine, state, client, load_plans(settings.plans_file))
    finally:
        state.close()
        client.close()
        engine.dispose()


def _run(action: Callable[[Ctx], T]) -> T:
    try:
        with _ctx() as ctx:
            return action(ctx)
    except (DarkGpuError, KeyError, ValueError) as exc:  # errors in words, no trace
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except redis.RedisError as exc:
        typer.echo(
            f"error: Redis not updated ({exc}); SQL holds the change. "
            "Run `darkgpu admin redis rebuild` once Redis is reachable.",
            err=True,
        )
        raise typer.Exit(2) from None


def _print(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


AccountOpt = Annotated[int, typer.Option("--account", help="Account id.")]


@account_app.command("create")
def account_create(
    email: Annotated[str, typer.Option(help="Unique email of the account.")],
    plan: Annotated[str | None, typer.Option(help="Plan (default: the plans file's).")] = None,
) -> None:
    """Create an account (the free plan grants its signup credits once)."""
    info = _run(lambda c: svc.create_account(c.engine, c.redis, c.plans, email=email, plan=plan))
    _print(info.to_json())


@account_app.command("show")
def account_show(account: AccountOpt) -> None:
    """The account with its credits summary."""

    def show(c: Ctx) -> dict[str, Any]:
        info = svc.get_account(c.engine, account).to_json()
        info["credits"] = reports.credits_summary(c.engine, c.redis, c.plans, account).to_json()
        return info

    _print(_run(show))


@account_app.command("update")
def account_update(
    account: AccountOpt,
    plan: Annotated[str | None, typer.Option(help="Move to this plan.")] = None,
    status: Annotated[str | None, typer.Option(help="active | suspended")] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests/min override.")] = None,
    plan_rpm: Annotated[bool, typer.Option("--plan-rpm", help="Drop the rpm override.")] = False,
    tier: Annotated[
        str | None,
        typer.Option(help="Trust tier its requests inherit: basic | verified | any."),
    ] = None,
    operator: Annotated[
        bool | None,
        typer.Option(
            "--operator/--no-operator",
            help="One of the operator's accounts (the console's operator pages).",
        ),
    ] = None,  # fmt: skip
) -> None:
    """Change an account's plan, status, requests/min, default trust tier or operator role."""

    def update(c: Ctx) -> dict[str, Any]:
        if plan:
            svc.set_plan(c.engine, c.redis, c.plans, account_id=account, plan=plan)
        if status:
            svc.set_status(c.engine, c.redis, account_id=account, status=status, sessions=c.state)
        if rpm is not None or plan_rpm:
            svc.set_limits(
                c.engine, c.redis, account_id=account, requests_per_minute=None if plan_rpm else rpm
            )
        if tier:
            default = None if tier == "any" else tier
            svc.set_default_tier(c.engine, c.redis, account_id=account, tier=default)
        if operator is not None:
            svc.set_operator(c.engine, account_id=account, operator=operator)
        return {**svc.get_account(c.engine, account).to_json(),
                "operator": svc.is_operator(c.engine, account)}  # fmt: skip

    _print(_run(update))


@account_app.command("suspend")
def account_suspend(account: AccountOpt) -> None:
    """Suspend an account: its keys are refused on their next request and its console
    sessions end (`update --status active` lifts it)."""

    def suspend(c: Ctx) -> dict[str, Any]:
        ended = svc.set_status(
            c.engine, c.redis, account_id=account, status="suspended", sessions=c.state
        )
        return {**svc.get_account(c.engine, account).to_json(), "console_sessions_ended": ended}

    _print(_run(suspend))


@account_app.command("flags")
def account_flags(
    account: Annotated[int | None, typer.Option("--account", help="Only this account.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Resolved flags too.")] = False,
) -> None:
    """Open account flags (refunds or disputes of spent credits, open disputes): while one
    is open the account's providers are not paid."""
    found = _run(lambda c: flags.list_flags(c.engine, account_id=account, all_=all_))
    _print([flag.to_json() for flag in found])


@account_app.command("resolve-flag")
def account_resolve_flag(
    flag: Annotated[int, typer.Argument(help="The flag's id (see `account flags`).")],
) -> None:
    """Mark a flag dealt with; the account's providers are paid again once none is open."""
    _print(_run(lambda c: flags.resolve(c.engine, flag)).to_json())


@key_app.command("create")
def key_create(
    account: AccountOpt,
    name: Annotated[str | None, typer.Option(help="A label for the key.")] = None,
) -> None:
    """Create an API key. The key is printed once, here, and never again."""
    info = _run(lambda c: svc.create_key(c.engine, c.redis, account_id=account, name=name))
    _print(info.to_json())


@key_app.command("list")
def key_list(account: AccountOpt) -> None:
    """The account's keys (prefixes only)."""
    _print([k.to_json() for k in _run(lambda c: svc.list_keys(c.engine, account))])


@key_app.command("revoke")
def key_revoke(
    key_id: Annotated[int | None, typer.Option("--key-id", help="Key id.")] = None,
    prefix: Annotated[str | None, typer.Option(help="The key's display prefix.")] = None,
) -> None:
    """Revoke a key; every ingress refuses it from its next request on."""
    info = _run(lambda c: svc.revoke_key(c.engine, c.redis, key_id=key_id, prefix=prefix))
    _print(info.to_json())


@credits_app.command("grant")
def credits_grant(
    account: AccountOpt,
    usd: Annotated[str, typer.Option(help="Dollars, e.g. 25 or 12.50.")],
    idempotency_key: Annotated[
        str | None, typer.Option(help="Grant at most once per key (default: a new one).")
    ] = None,
    memo: Annotated[str | None, typer.Option(help="Why.")] = None,
) -> None:
    """Grant promotional credits."""

    def grant(c: Ctx) -> dict[str, Any]:
        transfer = svc.grant_credits(
            c.engine,
            c.redis,
            account_id=account,
            amount_nusd=usd_to_nusd(usd),
            idempotency_key=idempotency_key,
            memo=memo,
        )
        info = svc.get_account(c.engine, account).to_json()
        info["transfer_id"] = transfer
        info["granted"] = transfer is not None
        return info

    _print(_run(grant))


@credits_app.command("show")
def credits_show(account: AccountOpt) -> None:
    """Balance, today's tokens and cap, and when the cap resets."""
    _print(_run(lambda c: reports.credits_summary(c.engine, c.redis, c.plans, account).to_json()))


@cap_app.command("set")
def cap_set(
    account: AccountOpt,
    tokens_per_day: Annotated[
        int | None, typer.Option("--tokens-per-day", help="Tokens per UTC day.")
    ] = None,
    customer: Annotated[
        str | None, typer.Option(help="Cap this customer tag (X-Customer-Id; * = every tag).")
    ] = None,
    clear: Annotated[bool, typer.Option(help="Remove the cap (back to the plan's).")] = False,
) -> None:
    """Set the daily token cap of an account, or of one of its customer tags."""
    if (tokens_per_day is not None) == clear:
        typer.echo("error: give --tokens-per-day N or --clear", err=True)
        raise typer.Exit(1)

    def set_cap(c: Ctx) -> dict[str, Any]:
        if customer:
            svc.set_customer_cap(
                c.engine,
                c.redis,
                account_id=account,
                customer_tag=customer,
                tokens_per_day=tokens_per_day,
            )
        else:
            svc.set_limits(c.engine, c.redis, account_id=account, tokens_per_day=tokens_per_day)
        return {"account_id": account, "customer_tag": customer, "tokens_per_day": tokens_per_day}

    _print(_run(set_cap))


@ledger_app.command("verify")
def ledger_verify(
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="From the first row, trusting no checkpoint. Without it the check starts "
            "from the last verified checkpoint and trusts the append-only triggers for the "
            "rows before it: a row changed behind their back before the checkpoint is found "
            "only by --full.",
        ),
    ] = False,
    margin: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds: the new checkpoint covers only rows older than this (writers' "
            "transactions still open commit within it).",
        ),
    ] = verify.MARGIN_S,
) -> None:
    """Check the usage hash chain, that the double-entry ledger sums to zero and that every
    paid request was charged once, from the last verified checkpoint (exit 1 if not). A pass
    writes a new checkpoint; the output says which checkpoint the check started from and how
    many rows it read."""
    result = _run(lambda c: verify.verify_ledger(c.engine, full=full, margin_s=margin))
    _print(result.to_json())
    if not result.ok:
        raise typer.Exit(1)


def _when(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"not an ISO date or time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@usage_app.command("export")
def usage_export(
    start: Annotated[str, typer.Option(help="From (inclusive), ISO date/time, UTC.")],
    end: Annotated[str, typer.Option(help="To (exclusive), ISO date/time, UTC.")],
    csv_out: Annotated[bool, typer.Option("--csv", help="One CSV row per request.")] = False,
    account: Annotated[int | None, typer.Option("--account", help="Only this account.")] = None,
    group_by: Annotated[str, typer.Option(help="day | model | customer (JSON output)")] = "day",
) -> None:
    """Usage in [start, end): per request as CSV, or grouped as JSON."""
    begin, finish = _when(start), _when(end)
    if group_by not in ("day", "model", "customer"):
        raise typer.BadParameter("group-by is day, model or customer")
    if csv_out:
        _run(
            lambda c: reports.export_usage_csv(
                c.engine, sys.stdout, start=begin, end=finish, account_id=account
            )
        )
        return
    rows = _run(
        lambda c: reports.usage_report(
            c.engine,
            start=begin,
            end=finish,
            group_by=group_by,  # type: ignore[arg-type]
            account_id=account,
        )
    )
    _print([row.to_json() for row in rows])


@redis_app.command("rebuild")
def redis_rebuild() -> None:
    """Rebuild Redis (keys, limits, balances, today's use) from SQL."""
    from billing.meter import UsageMeter
    from billing.rebuild import rebuild

    report = _run(lambda c: rebuild(c.engine, c.redis, meter=UsageMeter(c.engine, c.redis)))
    _print(report.__dict__)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Upgrade the database schema to the newest revision."""
    _run(lambda c: None)
    typer.echo("database is at the newest revision")


# --- payouts and reconciliation (issue 4) -------------------------------------------------

payouts_app = typer.Typer(help="Weekly provider payouts (Stripe Connect).", no_args_is_help=True)
app.add_typer(payouts_app, name="payouts")


@payouts_app.command("run")
def payouts_run(
    week: Annotated[
        str | None, typer.Option(help="ISO week YYYY-Www (default: the last week that ended).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be paid; change nothing.")
    ] = False,
) -> None:
    """Pay providers for a week: one Stripe transfer each where at least $10 is due and payouts
    are enabled (exit 1 if a transfer failed or went unanswered; rerunning is safe)."""
    from billing.payouts import IsoWeek, run_payouts
    from billing.stripe_client import maybe_stripe_client

    def run(c: Ctx) -> Any:
        client = None if dry_run else maybe_stripe_client(c.settings)
        return run_payouts(
            c.engine, client, week=IsoWeek.parse(week) if week else None, dry_run=dry_run
        )

    report = _run(run)
    _print(report.to_json())
    if not report.ok:
        raise typer.Exit(1)


FEE_SYNC_WINDOW = timedelta(days=35)
fees_app = typer.Typer(help="Stripe's fees, from its balance transactions.", no_args_is_help=True)
app.add_typer(fees_app, name="fees")


def _sync_fees(c: Ctx, since: datetime | None) -> Any:
    """Book the Stripe fees not booked yet; None when payments are not configured."""
    from billing.fees import sync_fees
    from billing.stripe_client import maybe_stripe_client

    client = maybe_stripe_client(c.settings)
    return None if client is None else sync_fees(c.engine, client, since=since)


@fees_app.command("sync")
def fees_sync(
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Refunded or disputed payments changed since this UTC day (YYYY-MM-DD) only; "
            "unbooked charge fees are read whatever their age.",
        ),
    ] = None,
) -> None:
    """Read the balance transactions of paid purchases whose fees are not booked (and of
    refunded or disputed ones) and book Stripe's fees in the ledger (exit 1 if one could not
    be read or booked; rerunning is safe)."""
    start = _when(since) if since else None
    report = _run(lambda c: _sync_fees(c, start))
    if report is None:
        typer.echo("error: payments are not configured (DARKGPU_STRIPE_SECRET_KEY)", err=True)
        raise typer.Exit(1)
    _print(report.to_json())
    if not report.ok:
        raise typer.Exit(1)


@app.command("reconcile")
def reconcile_cmd(
    date_: Annotated[str, typer.Option("--date", help="The UTC day to check, YYYY-MM-DD.")],
    csv_path: Annotated[
        str | None,
        typer.Option(
            "--csv", help="Write the day's QuickBooks journal entries here (- for stdout)."
        ),
    ] = None,
    stripe_fees: Annotated[
        bool,
        typer.Option(
            "--stripe-fees/--no-stripe-fees",
            help="First book Stripe fees not booked yet (needs Stripe configured).",
        ),
    ] = True,
) -> None:
    """Check usage, the ledgers, Redis and Stripe against each other (exit 1 on a mismatch);
    optionally write the day's balanced journal for bookkeeping software. Stripe's fees not
    booked yet are read from Stripe first, where payments are configured."""
    from datetime import date as date_type

    from billing import journal
    from billing.reconcile import reconcile

    try:
        day = date_type.fromisoformat(date_)
    except ValueError:
        raise typer.BadParameter(f"not a date (YYYY-MM-DD): {date_!r}") from None

    def run(c: Ctx) -> Any:
        # unbooked fees of any age; refunds and disputes of the last weeks
        since = datetime(day.year, day.month, day.day, tzinfo=UTC) - FEE_SYNC_WINDOW
        synced = _sync_fees(c, since) if stripe_fees else None
        if csv_path == "-":
            journal.write(c.engine, sys.stdout, start=day)
        elif csv_path:
            with open(csv_path, "w", newline="") as out:
                journal.write(c.engine, out, start=day)
        return synced, reconcile(c.engine, c.redis, day=day)

    synced, report = _run(run)
    body = report.to_json()
    if synced is not None:
        body["fees_sync"] = synced.to_json()
    if csv_path != "-":
        _print(body)
    else:
        typer.echo(json.dumps(body, sort_keys=True, default=str), err=True)
    if not report.ok:
        raise typer.Exit(1)


journal_app = typer.Typer(help="The ledger for bookkeeping software.", no_args_is_help=True)
app.add_typer(journal_app, name="journal")


@journal_app.command("export")
def journal_export(
    from_: Annotated[str, typer.Option("--from", help="First UTC day, YYYY-MM-DD.")],
    to: Annotated[str, typer.Option("--to", help="Last UTC day (inclusive), YYYY-MM-DD.")],
    out_path: Annotated[
        str | None, typer.Option("--out", help="Write the CSV here (default: stdout).")
    ] = None,
) -> None:
    """Write QuickBooks Online's journal-entry import CSV for the days given: one balanced
    entry per day per pair of ledger accounts, in dollars and cents (billing.journal says how
    nano-dollars are rounded). The summary goes to stderr."""
    from datetime import date as date_type

    from billing import journal

    try:
        start, end = date_type.fromisoformat(from_), date_type.fromisoformat(to)
    except ValueError:
        raise typer.BadParameter(f"not a date (YYYY-MM-DD): {from_!r} / {to!r}") from None
    if end < start:
        raise typer.BadParameter(f"--to {to} is before --from {from_}")

    def run(c: Ctx) -> int:
        if out_path is None:
            return journal.write(c.engine, sys.stdout, start=start, end=end)
        with open(out_path, "w", newline="") as out:
            return journal.write(c.engine, out, start=start, end=end)

    n = _run(run)
    typer.echo(
        json.dumps({"from": from_, "to": to, "entries": n, "lines": 2 * n, "out": out_path}),
        err=True,
    )


if __name__ == "__main__":  # pragma: no cover
    app()
