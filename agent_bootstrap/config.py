"""`~/.config/darkgpu/provider.toml`: the provider's choices, validated by pydantic.

The spec's keys (`api_url`, `price_floor_pct`, `idle_detection`, `[[schedule]]`) plus a few
with defaults that run as the spec describes:

    api_url = "https://api.darkgpu.ai"
    price_floor_pct = 0          # 0 = accept catalog prices; 20 = ask 20% above them
    idle_detection = true        # pause when another process uses the GPU
    idle_rejoin_after_s = 600    # ...and rejoin once the GPU has been idle this long
    timezone = "local"           # schedule times: "local", "UTC" or an IANA name
    drain_timeout_s = 300        # the most a leaving node serves on while its replicas move
    node_ip_address = "10.8.0.2" # this machine's overlay (WireGuard) address, for Ray
    ignore_processes = []        # more process names idle detection never counts
    models = []                  # catalog models this GPU serves (ids); empty: any that fits

    [[schedule]]                 # none: always lend the GPU
    days = ["mon", "tue", "wed", "thu", "fri"]
    start = "22:00"
    end = "08:00"
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import tomllib
from pathlib import Path
from typing import Annotated
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent_bootstrap.paths import CONFIG_FILE, config_dir, ensure_private_dir
from agent_bootstrap.schedule import LOCAL, Window, resolve_zone

DEFAULT_API_URL = "https://api.darkgpu.ai"


class ConfigError(ValueError):
    """provider.toml is missing or invalid; the message names the file and the field."""


class ProviderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_url: str = DEFAULT_API_URL
    price_floor_pct: int = Field(default=0, ge=0, le=1000)
    idle_detection: bool = True
    idle_rejoin_after_s: int = Field(default=600, ge=0, le=7 * 24 * 3600)
    timezone: str = LOCAL
    # Leaving, the node serves on until Serve has started each of its replicas elsewhere
    # (at most this long: then Ray stops them, ready or not). A replica takes a model-load
    # time to start (71-100 s for the tiny model on a loaded 2-core test machine; minutes for
    # a large model on a GPU); the agent leaves as soon as its processes are gone.
    drain_timeout_s: int = Field(default=300, ge=0, le=3600)
    node_ip_address: str | None = None
    ignore_processes: list[str] = Field(default_factory=list, max_length=100)
    schedule: list[Window] = Field(default_factory=list, max_length=64)
    models: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list, max_length=64
    )

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        resolve_zone(value)
        return value

    @field_validator("node_ip_address")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)
        return value


def _error_text(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(file)"
        lines.append(f"  {where}: {err['msg']}")
    return f"{path} is invalid:\n" + "\n".join(lines)


def parse(text: str, path: Path = Path(CONFIG_FILE)) -> ProviderConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        return ProviderConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_error_text(path, exc)) from None


def load(path: Path) -> ProviderConfig:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; run the installer or `darkgpu serve`") from None
    return parse(text, path)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string for these characters
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def render(config: ProviderConfig) -> str:
    """The config as TOML (the schedule as `[[schedule]]` tables)."""
    data = config.model_dump(mode="json")
    windows = data.pop("schedule")
    lines = ["# DarkGPU provider configuration (see configs/provider.example.toml)"]
    for key, value in data.items():
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for window in windows:
        lines += ["", "[[schedule]]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in window.items()]
    return "\n".join(lines) + "\n"


def write(path: Path, config: ProviderConfig) -> None:
    ensure_private_dir(path.parent)
    path.write_text(render(config))


def ensure(path: Path | None = None, defaults: ProviderConfig | None = None) -> ProviderConfig:
    """Validate `path` when it exists; write `defaults` there when it does not."""
    path = path or config_dir() / CONFIG_FILE
    if path.exists():
        return load(path)
    config = defaults or ProviderConfig()
    write(path, config)
    return config


def main(argv: list[str] | None = None) -> int:
    """`python -m agent_bootstrap.config [--api-url URL] [PATH]` (the installer uses it)."""
    parser = argparse.ArgumentParser(description="Write or validate provider.toml.")
    parser.add_argument("path", nargs="?", type=Path, default=None)
    parser.add_argument("--api-url", default=DEFAULT_API_URL)
    args = parser.parse_args(argv)
    path = args.path or config_dir() / CONFIG_FILE
    existed = path.exists()
    try:
        ensure(path, ProviderConfig(api_url=args.api_url))
    except (ConfigError, ValidationError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{path}: {'valid' if existed else 'written'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
