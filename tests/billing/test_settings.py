from pathlib import Path

import pytest

from billing.settings import DEFAULT_PLANS_FILE, BillingSettings


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DARKGPU_DATABASE_URL", "DARKGPU_REDIS_URL", "DARKGPU_PLANS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DARKGPU_DATA_DIR", str(tmp_path / "data"))
    settings = BillingSettings()
    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'darkgpu.db'}"
    assert settings.redis_url == "redis://127.0.0.1:6381/0"
    assert settings.plans_file == DEFAULT_PLANS_FILE
    assert settings.plans_file.is_file()


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DARKGPU_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("DARKGPU_REDIS_URL", "redis://h:1/2")
    monkeypatch.setenv("DARKGPU_PLANS_FILE", str(tmp_path / "p.toml"))
    settings = BillingSettings()
    assert settings.database_url == "postgresql+psycopg://u@h/db"
    assert settings.redis_url == "redis://h:1/2"
    assert settings.plans_file == tmp_path / "p.toml"
