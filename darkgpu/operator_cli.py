"""The operator's commands: `darkgpu up`, `darkgpu down` and `darkgpu admin …`.

They run the platform (Serve, SQL, Redis, Stripe), so they need `darkgpu[platform]`;
darkgpu.cli adds them only where their imports succeed, and the provider's commands work
without them.
"""

from __future__ import annotations

import time

import typer

from billing.cli import app as admin_app
from billing.enterprise_cli import app as enterprise_app
from cluster.cli import app as provider_admin_app
from darkgpu.local_platform import LocalPlatform

# `admin` is billing's Typer app; the provider registry's commands join it here, where both
# are in reach (billing and cluster never import each other).
admin_app.add_typer(provider_admin_app, name="provider")
admin_app.add_typer(enterprise_app, name="enterprise")
ADMIN_HELP = "Accounts, keys, credits, caps, the ledger, and providers' tokens."


def up() -> None:
    """Start the platform on this machine and print where the API is."""
    platform = LocalPlatform.from_env()
    settings = platform.settings
    if platform.is_up():
        typer.echo(f"DarkGPU is already running: {settings.api_url}")
        return
    started = time.monotonic()
    try:
        platform.up(say=typer.echo)
    except Exception as exc:  # a failed start leaves nothing half-started
        typer.echo(f"Start-up failed: {exc}", err=True)
        platform.down()
        raise typer.Exit(1) from None
    typer.echo(f"DarkGPU is up in {time.monotonic() - started:.0f} s.")
    typer.echo(f"  API:        {settings.api_url}")
    typer.echo(f"  Console:    {settings.api_url.removesuffix('/v1')}/console")
    typer.echo(f"  Dashboard:  http://127.0.0.1:{settings.dashboard_port}")
    typer.echo(f"  Metrics:    http://127.0.0.1:{settings.metrics_port}/metrics")
    typer.echo("Create an account and a key: darkgpu admin account create --email E --plan free")


def down() -> None:
    """Stop everything `darkgpu up` started."""
    if LocalPlatform.from_env().down():
        typer.echo("DarkGPU is down.")
    else:
        typer.echo("DarkGPU is not running.")


def register_commands(target: typer.Typer) -> None:
    """Add `up`, `down` and `admin` to `target` (the `darkgpu` app)."""
    target.command()(up)
    target.command()(down)
    target.add_typer(admin_app, name="admin", help=ADMIN_HELP)
