"""`darkgpu`: the one command. Operators: `up`, `down`; more subcommands join as they land."""

from __future__ import annotations

import time

import typer

from cluster.local import LocalCluster
from cluster.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


@app.command()
def up() -> None:
    """Start a local Ray head and the Serve application, and print where the API is."""
    settings = Settings()
    cluster = LocalCluster(settings)
    cluster.apply_env()
    from serve_app.deploy import deploy, is_deployed

    if cluster.is_running() and is_deployed(cluster.address):
        typer.echo(f"DarkGPU is already running: {settings.api_url}")
        return
    started = time.monotonic()
    if not cluster.is_running():
        typer.echo(f"Starting the Ray head on {cluster.address} ...")
        cluster.start_head()
    typer.echo("Deploying the Serve application (the first start takes a few minutes) ...")
    try:
        deploy(settings, cluster.address)
    except Exception as exc:  # a failed deployment leaves nothing half-started
        typer.echo(f"Deployment failed: {exc}", err=True)
        cluster.stop()
        raise typer.Exit(1) from None
    typer.echo(f"DarkGPU is up in {time.monotonic() - started:.0f} s.")
    typer.echo(f"  API:        {settings.api_url}")
    typer.echo(f"  Dashboard:  http://127.0.0.1:{settings.dashboard_port}")
    typer.echo(f"  Metrics:    http://127.0.0.1:{settings.metrics_port}/metrics")


@app.command()
def down() -> None:
    """Stop everything `darkgpu up` started."""
    settings = Settings()
    cluster = LocalCluster(settings)
    cluster.apply_env()
    if not cluster.is_running():
        typer.echo("DarkGPU is not running.")
        return
    cluster.stop()
    typer.echo("DarkGPU is down.")


if __name__ == "__main__":
    app()
