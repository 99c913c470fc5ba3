from __future__ import annotations

from pathlib import Path

import pytest

from agent_bootstrap import credentials as creds
from agent_bootstrap.credentials import Credentials, CredentialsError

SAMPLE = Credentials(
    api_url="https://api.darkgpu.ai",
    provider_id="prv_0123456789abcdef",
    provider_token="dgpp-" + "a" * 43,
    cluster_address="10.8.0.1:6380",
    ray_auth_token="secret-ray-token",
)


def test_saved_credentials_are_private_and_load_back(tmp_path: Path) -> None:
    path = creds.save(SAMPLE, tmp_path / "d")
    assert (path.stat().st_mode & 0o777) == 0o600
    assert (creds.ray_token_path(tmp_path / "d").stat().st_mode & 0o777) == 0o600
    assert creds.load(tmp_path / "d") == SAMPLE
    creds.save(SAMPLE.model_copy(update={"ray_auth_token": "rotated"}), tmp_path / "d")
    assert creds.ray_token_path(tmp_path / "d").read_text() == "rotated"  # re-auth replaces


def test_loading_refuses_missing_open_or_damaged_files(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="darkgpu auth"):
        creds.load(tmp_path)
    path = creds.save(SAMPLE, tmp_path)
    path.chmod(0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        creds.load(tmp_path)
    path.chmod(0o600)
    path.write_text("{")
    with pytest.raises(CredentialsError, match="damaged"):
        creds.load(tmp_path)


@pytest.mark.parametrize("token", ["", "dgpu-" + "a" * 43, "hello"])
def test_a_token_that_is_not_a_provider_token_is_refused_before_any_call(token: str) -> None:
    with pytest.raises(CredentialsError, match="dgpp-"):
        creds.exchange("http://127.0.0.1:9", token)


def test_an_unreachable_platform_is_reported() -> None:
    with pytest.raises(CredentialsError, match="cannot reach"):
        creds.exchange("http://127.0.0.1:9", "dgpp-" + "a" * 43)
