from __future__ import annotations

from pathlib import Path

import pytest

from agent_bootstrap import config
from agent_bootstrap.config import ConfigError, ProviderConfig

REPO = Path(__file__).resolve().parents[2]

SPEC_EXAMPLE = """\
api_url = "https://api.darkgpu.ai"
price_floor_pct = 0 # 0 = accept catalog prices
idle_detection = true # pause when GPU is in active use
[[schedule]]
days = ["mon", "tue", "wed", "thu", "fri"]
start = "22:00"
end = "08:00"
"""


def test_the_spec_example_is_valid() -> None:
    got = config.parse(SPEC_EXAMPLE)
    assert got.api_url == "https://api.darkgpu.ai"
    assert got.price_floor_pct == 0 and got.idle_detection is True
    assert len(got.schedule) == 1 and got.schedule[0].crosses_midnight
    assert got.schedule[0].days == ("mon", "tue", "wed", "thu", "fri")


def test_the_repository_example_is_valid() -> None:
    got = config.load(REPO / "configs" / "provider.example.toml")
    assert len(got.schedule) == 2 and got.timezone == "local"


def test_render_round_trips() -> None:
    original = config.parse(
        'timezone = "Europe/Berlin"\nnode_ip_address = "10.8.0.2"\n'
        'ignore_processes = ["obs", "steam"]\n' + SPEC_EXAMPLE
    )
    assert config.parse(config.render(original)) == original


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("price_floor_pct = -5", "price_floor_pct"),
        ("price_floor_pct = 5000", "price_floor_pct"),
        ('api_url = "ftp://x"', "api_url"),
        ("idle_detection = 3", "idle_detection"),
        ('timezone = "Mars/Olympus"', "timezone"),
        ('node_ip_address = "not-an-ip"', "node_ip_address"),
        ("surprise = 1", "surprise"),
        ('[[schedule]]\nstart = "22:00"\nend = "26:00"', "schedule.0.end"),
        ('[[schedule]]\ndays = ["someday"]\nstart = "22:00"\nend = "08:00"', "schedule.0.days"),
    ],
)
def test_invalid_configs_name_the_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(text, Path("/etc/provider.toml"))
    assert "/etc/provider.toml is invalid" in str(info.value)
    assert f"  {field}" in str(info.value)


def test_invalid_toml_and_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.parse("api_url = ")
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


def test_ensure_writes_once_then_validates(tmp_path: Path) -> None:
    path = tmp_path / "darkgpu" / "provider.toml"
    written = config.ensure(path, ProviderConfig(api_url="http://127.0.0.1:8000/"))
    assert written.api_url == "http://127.0.0.1:8000"
    assert path.exists() and (path.parent.stat().st_mode & 0o777) == 0o700
    path.write_text(path.read_text().replace("price_floor_pct = 0", "price_floor_pct = 25"))
    assert config.ensure(path, ProviderConfig()).price_floor_pct == 25  # kept, not rewritten
    path.write_text("price_floor_pct = -1\n")
    with pytest.raises(ConfigError):
        config.ensure(path, ProviderConfig())


def test_the_module_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "provider.toml"
    assert config.main(["--api-url", "https://example.test", str(path)]) == 0
    assert config.load(path).api_url == "https://example.test"
    assert config.main([str(path)]) == 0 and "valid" in capsys.readouterr().out
    path.write_text("idle_detection = 'maybe'\n")
    assert config.main([str(path)]) == 1
