"""The operator's commands: `darkgpu up`, `darkgpu down` and `darkgpu admin …`.

They run the platform (Serve, SQL, Redis, Stripe), so they need `darkgpu[platform]`;
darkgpu.cli adds them only where their imports succeed, and the provider's commands work
without them.
"""

from __future__ import annotations

import traceback

import typer

from billing.cli import app as admin_app
from billing.enterprise_cli import app as enterprise_app
from cluster.cli import app as provider_admin_app
from cluster.pools import pools
from darkgpu.local_platform import LocalPlatform
from darkgpu.progress import Progress, captured

# `admin` is billing's Typer app; the provider registry's commands join it here, where both
# are in reach (billing and cluster never import each other).
admin_app.add_typer(provider_admin_app, name="provider")
admin_app.add_typer(enterprise_app, name="enterprise")
ADMIN_HELP = "Accounts, keys, credits, caps, the ledger, and providers' tokens."


def up() -> None:
    """Start the platform on this machine and print where the API is."""
    platform = LocalPlatform.from_env()
    settings = platform.settings
    log = settings.resolved_data_dir / "logs" / "up.log"
    failed: BaseException | None = None
    with captured(log) as terminal:  # importing Serve and vLLM prints too
        progress = Progress(terminal)
        try:
            running = platform.is_up()
        except Exception as exc:
            traceback.print_exc()  # into the log
            running, failed = False, exc
        if running:
            terminal.write(f"DarkGPU is already running: {settings.api_url}\n")
            return
        if failed is None:
            terminal.write(f"Starting DarkGPU (Ray's, Serve's, vLLM's and Redis's own output: "
                           f"{log})\n")  # fmt: skip
            try:
                platform.up(progress)
            except Exception as exc:  # a failed start leaves nothing half-started
                traceback.print_exc()  # into the log
                failed = exc
                with progress.step("Stopping what was started"):
                    platform.down()
    if failed is not None:
        typer.echo(f"Start-up failed: {failed}", err=True)
        typer.echo(f"The details are in {log}", err=True)
        raise typer.Exit(1)
    typer.echo(f"DarkGPU is up in {progress.elapsed():.0f} s.")
    typer.echo(f"  API:        {settings.api_url}")
    typer.echo(f"  Console:    {settings.api_url.removesuffix('/v1')}/console")
    typer.echo(f"  Dashboard:  http://127.0.0.1:{settings.dashboard_port} (control plane)")
    typer.echo(f"  Metrics:    http://127.0.0.1:{settings.metrics_port}/metrics")
    for pool in pools(settings).values():
        own = pool.settings
        typer.echo(f"  Pool ({pool.tier.value}): {pool.agent_address} (where its providers' nodes "
                   f"join), dashboard http://127.0.0.1:{own.dashboard_port}, metrics "
                   f"http://127.0.0.1:{own.metrics_port}/metrics")  # fmt: skip
    typer.echo("Create an account and a key: darkgpu admin account create --email E --plan free")


def down() -> None:
    """Stop everything `darkgpu up` started."""
    platform = LocalPlatform.from_env()
    with captured(platform.settings.resolved_data_dir / "logs" / "down.log"):
        stopped = platform.down()
    typer.echo("DarkGPU is down." if stopped else "DarkGPU is not running.")


def register_commands(target: typer.Typer) -> None:
    """Add `up`, `down` and `admin` to `target` (the `darkgpu` app)."""
    target.command()(up)
    target.command()(down)
    target.add_typer(admin_app, name="admin", help=ADMIN_HELP)
