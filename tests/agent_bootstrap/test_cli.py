"""The provider's Typer commands on this machine (no NVIDIA driver here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from agent_bootstrap.cli import app, register_commands
from agent_bootstrap.nvml import GpuUnavailable, detect

runner = CliRunner()


def _no_driver_here() -> bool:
    try:
        detect()
    except GpuUnavailable:
        return True
    return False  # pragma: no cover - a machine with a GPU


@pytest.fixture(autouse=True)
def config_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("DARKGPU_CONFIG_DIR", str(tmp_path / "conf"))
    return tmp_path / "conf"


@pytest.mark.skipif(not _no_driver_here(), reason="this machine has an NVIDIA driver")
def test_serve_refuses_without_a_driver_and_writes_nothing(config_home: Path) -> None:
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 1
    assert "No NVIDIA driver" in result.output
    assert not config_home.exists()


def test_status_without_credentials_says_how_to_sign_in(config_home: Path) -> None:
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 1
    assert "GPU:" in result.output
    assert "darkgpu auth" in result.output


def test_auth_refuses_a_consumer_key_before_calling_anyone(config_home: Path) -> None:
    result = runner.invoke(app, ["auth", "--token", "dgpu-" + "a" * 43, "--api-url", "http://x"])
    assert result.exit_code == 1 and "dgpp-" in result.output
    assert not (config_home / "credentials.json").exists()


def test_commands_mount_at_the_top_level() -> None:
    top = typer.Typer()

    @top.command()
    def up() -> None: ...

    register_commands(top)
    result = runner.invoke(top, ["--help"])
    assert result.exit_code == 0
    for name in ("auth", "serve", "status", "up"):
        assert name in result.output
