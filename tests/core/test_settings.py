from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import DEFAULT_PLANS_FILE, Settings


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DARKGPU_DATABASE_URL", "DARKGPU_REDIS_URL", "DARKGPU_STATE_REDIS_URL",
                 "DARKGPU_STATE_REDIS_MAXMEMORY_MB", "DARKGPU_PLANS_FILE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DARKGPU_DATA_DIR", str(tmp_path / "data"))
    settings = Settings()
    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'darkgpu.db'}"
    assert settings.redis_url == "redis://127.0.0.1:6381/0"
    # a second server of its own, bounded: what is not money never shares the money Redis
    assert settings.state_redis_url == "redis://127.0.0.1:6382/0"
    assert settings.state_redis_maxmemory_mb == 256
    assert settings.plans_file == DEFAULT_PLANS_FILE
    assert settings.plans_file.is_file()


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DARKGPU_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("DARKGPU_REDIS_URL", "redis://h:1/2")
    monkeypatch.setenv("DARKGPU_PLANS_FILE", str(tmp_path / "p.toml"))
    monkeypatch.setenv("DARKGPU_STATE_REDIS_URL", "redis://s:3/4")
    monkeypatch.setenv("DARKGPU_STATE_REDIS_MAXMEMORY_MB", "64")
    settings = Settings()
    assert settings.database_url == "postgresql+psycopg://u@h/db"
    assert settings.redis_url == "redis://h:1/2"
    assert settings.state_redis_url == "redis://s:3/4"
    assert settings.state_redis_maxmemory_mb == 64
    assert settings.plans_file == tmp_path / "p.toml"


def test_a_misspelt_setting_is_an_error_not_dropped(tmp_path: Path) -> None:
    """`configs/serve.yaml`'s `args` reach `Settings(**args)`: a typo must not pass silently."""
    with pytest.raises(ValidationError) as info:
        Settings(data_dir=tmp_path, max_replica=8)
    assert info.value.errors()[0]["type"] == "extra_forbidden"
    assert info.value.errors()[0]["loc"] == ("max_replica",)


def test_the_settings_cross_to_replicas_whole(tmp_path: Path) -> None:
    """What a replica gets (`as_args`) rebuilds the same settings, secrets included."""
    settings = Settings(data_dir=tmp_path, stripe_secret_key="sk_test_x", http_port=9000,
                        verified_pool={"token": "verified-credential"})  # fmt: skip
    again = Settings(**settings.as_args())
    assert again == settings
    assert again.stripe_secret_key.get_secret_value() == "sk_test_x"
    assert again.verified_pool.token.get_secret_value() == "verified-credential"


def test_each_trust_tier_has_a_pool_of_its_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The basic pool is the flat `pool_*` settings; the verified pool's are its own, from
    `DARKGPU_VERIFIED_POOL__*` over its defaults (ports apart from the basic pool's)."""
    monkeypatch.setenv("DARKGPU_VERIFIED_POOL__RAY_PORT", "7384")
    monkeypatch.setenv("DARKGPU_VERIFIED_POOL__URL", "http://10.9.0.2:8002/pool")
    basic, verified = Settings(data_dir=tmp_path, pool_ray_port=7383).pools.values()
    assert (basic.ray_port, basic.http_port) == (7383, 8001)
    assert (verified.ray_port, verified.http_port, verified.url) == (
        7384, 8002, "http://10.9.0.2:8002/pool"
    )  # fmt: skip


def test_a_platform_may_run_pools_for_some_tiers_only(tmp_path: Path) -> None:
    assert list(Settings(data_dir=tmp_path, pool_tiers=["basic"]).pools) == ["basic"]
    assert list(Settings(data_dir=tmp_path).pools) == ["basic", "verified"]
    for wrong in ([], ["gold"]):
        with pytest.raises(ValidationError):
            Settings(data_dir=tmp_path, pool_tiers=wrong)


def test_two_pools_never_run_as_one_user(tmp_path: Path) -> None:
    """A member of the basic pool runs code as its head's user: were the verified pool's head
    the same user, it could read that head's processes and its copy of the Ray token."""
    with pytest.raises(ValidationError, match="two users"):
        Settings(
            data_dir=tmp_path, pool_user="darkgpu-pool", verified_pool={"user": "darkgpu-pool"}
        )
    Settings(data_dir=tmp_path, pool_user="darkgpu-pool", verified_pool={"user": "darkgpu-pool-v"})


def test_the_state_redis_has_a_bound(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(data_dir=tmp_path, state_redis_maxmemory_mb=0)  # 0 is Redis's "no limit"
    assert info.value.errors()[0]["loc"] == ("state_redis_maxmemory_mb",)
