"""`darkgpu`: the one command. Operators: `up`, `down`, `admin …`; providers: `auth`, `serve`,
`status`."""

from __future__ import annotations

import time

import typer

from agent_bootstrap.cli import register_commands
from billing.cli import app as admin_app
from darkgpu.local_platform import LocalPlatform

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
app.add_typer(admin_app, name="admin", help="Accounts, keys, credits, caps and the ledger.")
register_commands(app)


@app.command()
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


@app.command()
def down() -> None:
    """Stop everything `darkgpu up` started."""
    if LocalPlatform.from_env().down():
        typer.echo("DarkGPU is down.")
    else:
        typer.echo("DarkGPU is not running.")


if __name__ == "__main__":
    app()
