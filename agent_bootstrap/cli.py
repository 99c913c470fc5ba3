"""The provider's commands: `darkgpu auth`, `darkgpu serve`, `darkgpu status`.

`app` is a Typer app holding the three; `register_commands(darkgpu_app)` adds them to the
`darkgpu` command at its top level (the spec runs `darkgpu auth`, not `darkgpu provider
auth`).
"""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from agent_bootstrap import config as provider_config
from agent_bootstrap import credentials as creds_mod
from agent_bootstrap import keys
from agent_bootstrap.agent import Agent, AgentDeps, RayCli
from agent_bootstrap.api import PlatformClient, PlatformError
from agent_bootstrap.config import ConfigError, ProviderConfig
from agent_bootstrap.credentials import CredentialsError
from agent_bootstrap.idle import LinuxProcTable
from agent_bootstrap.keys import KeyFileError
from agent_bootstrap.nvml import GpuUnavailable, NvmlReader, detect
from agent_bootstrap.paths import CONFIG_FILE, config_dir
from agent_bootstrap.schedule import is_open, next_change
from kernel.money import nusd_to_usd

app = typer.Typer(
    help="Lend this machine's NVIDIA GPU to DarkGPU.", no_args_is_help=True, add_completion=False
)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="provider.toml (default ~/.config/darkgpu/)")
]


def _fail(message: str) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(1)


def _config_path(path: Path | None) -> Path:
    return path or config_dir() / CONFIG_FILE


@app.command()
def auth(
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="DARKGPU_PROVIDER_TOKEN", help="dgpp-… (else prompted)"),
    ] = None,
    api_url: Annotated[str | None, typer.Option("--api-url", help="the platform's URL")] = None,
    config_path: ConfigOption = None,
) -> None:
    """Exchange a provider token for this machine's credentials (kept with mode 0600)."""
    path = _config_path(config_path)
    try:
        url = api_url or (
            provider_config.load(path).api_url if path.exists() else provider_config.DEFAULT_API_URL
        )
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if token is None:
        token = typer.prompt("Provider token (dgpp-…)", hide_input=True)
    try:
        credentials = creds_mod.exchange(url, token)
    except CredentialsError as exc:
        raise _fail(str(exc)) from None
    saved = creds_mod.save(credentials)
    typer.echo(f"Signed in as provider {credentials.provider_id}; credentials in {saved}.")
    if credentials.review != "approved":
        typer.echo(
            f"The provider is {credentials.review}: it joins the cluster once the operator "
            "approves it (a GPU whose confidential-computing attestation passes is approved "
            "when it registers). `darkgpu serve` registers it now and waits."
        )
    typer.echo("Next: darkgpu serve")


@app.command()
def serve(config_path: ConfigOption = None) -> None:
    """Detect the GPU, register, and lend it within the schedule until stopped."""
    try:
        reader = NvmlReader()
        detect(reader)  # refuse before anything else happens
        credentials = creds_mod.load()
        config = provider_config.ensure(
            _config_path(config_path), ProviderConfig(api_url=credentials.api_url)
        )
        key = keys.load_or_create()
    except (CredentialsError, ConfigError, GpuUnavailable, KeyFileError) as exc:
        raise _fail(str(exc)) from None
    if key.created:
        typer.echo(f"Created the X25519 key pair at {key.path}")
    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    deps = AgentDeps(
        gpu=reader,
        procs=LinuxProcTable(),
        platform=PlatformClient(config.api_url, credentials.provider_token),
        ray=RayCli(creds_mod.ray_token_path()),
        sleep=time.sleep,
        save_credentials=creds_mod.save,
    )
    agent = Agent(config, credentials, key, deps)
    try:
        agent.start()
        agent.run(lambda: stopping)
    except (GpuUnavailable, PlatformError) as exc:
        raise _fail(str(exc)) from None


@app.command()
def status(config_path: ConfigOption = None) -> None:
    """This machine's GPU, schedule, and the platform's view: status, tier, earnings."""
    path = _config_path(config_path)
    try:
        typer.echo(f"GPU:       {detect(NvmlReader()).summary()}")
    except GpuUnavailable as exc:
        typer.echo(f"GPU:       cannot serve: {exc}")
    try:
        config = provider_config.load(path)
    except ConfigError as exc:
        typer.echo(f"Config:    {exc}")
        config = None
    if config is not None:
        now = datetime.now(UTC)
        state = "open" if is_open(config.schedule, now, config.timezone) else "closed"
        change = next_change(config.schedule, now, config.timezone)
        until = f" until {change.astimezone():%a %H:%M}" if change else ""
        typer.echo(f"Schedule:  {state}{until} ({len(config.schedule) or 'no'} windows)")
    try:
        credentials = creds_mod.load()
    except CredentialsError as exc:
        raise _fail(str(exc)) from None
    api_url = config.api_url if config else credentials.api_url
    try:
        me = PlatformClient(api_url, credentials.provider_token).me()
    except PlatformError as exc:
        typer.echo(f"Provider:  {credentials.provider_id} (platform unreachable: {exc})")
        return
    earnings = me.get("earnings", {})
    typer.echo(f"Provider:  {me['id']} ({me['name']})")
    typer.echo(f"Status:    {me['status']}, last heartbeat {me.get('last_heartbeat_at')}")
    typer.echo(f"Trust:     {me['trust_tier']}")
    typer.echo(
        f"Earnings:  ${nusd_to_usd(int(earnings.get('earned_nusd', 0)))} from "
        f"{earnings.get('requests', 0)} requests; "
        f"${nusd_to_usd(int(earnings.get('payable_nusd', 0)))} to be paid out"
    )
    for line in market_lines(me, _market(api_url, credentials.provider_token)):
        typer.echo(line)


def _market(api_url: str, token: str) -> dict[str, Any] | None:
    try:
        return PlatformClient(api_url, token).market()
    except PlatformError:  # an older platform, or away: the rest of the status stands
        return None


def market_lines(me: dict[str, Any], market: dict[str, Any] | None) -> list[str]:
    """This provider's record, the demand per model and what a GPU like its own earned."""
    lines = []
    record = me.get("reputation")
    if record:
        lines.append(
            f"Record:    online {record['uptime_pct']}% of the last {record['window_hours']} h; "
            f"{record['requests_served']} requests served; {record['strikes']} usage strikes"
        )
    if market is None:
        return lines
    busiest = sorted(market.get("models", []), key=lambda m: -m["requests_per_hour"])[:3]
    for m in busiest:
        lines.append(
            f"Demand:    {m['model']}: {m['requests_per_hour']} requests/h over the last day, "
            f"{m['providers_last_hour']} providers serving in the last hour"
        )
    gpu = me.get("gpu") or {}
    gpus, vram = int(gpu.get("count") or 0), float(gpu.get("vram_gb") or 0)
    size = round(vram / gpus) if gpus else None
    for e in market.get("gpu_earnings", {}).get("data", []):
        if e["vram_gb_per_gpu"] == size:
            lines.append(
                f"Last week: a {size} GB GPU earned ${e['median_usd_per_gpu']} (median of "
                f"{e['gpus']}; the most ${e['most_usd_per_gpu']})"
            )
    return lines


def register_commands(target: typer.Typer) -> None:
    """Add `auth`, `serve` and `status` to `target` (the `darkgpu` app) at its top level."""
    for command in (auth, serve, status):
        target.command()(command)
