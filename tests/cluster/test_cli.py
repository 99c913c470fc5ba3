"""`darkgpu admin provider tokens …` through the `darkgpu` command, against real SQLite and
the provider routes served over real HTTP, where the agent's own `darkgpu auth` signs in."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine
from typer.testing import CliRunner

from agent_bootstrap import credentials as creds
from billing import accounts
from billing.plans import load_plans
from cluster import registry
from cluster.registry import ProviderPlatform
from core.db import make_engine, migrate
from core.settings import DEFAULT_PLANS_FILE, Settings
from darkgpu.cli import app
from serve_app.errors import install_error_handlers
from serve_app.routes_providers import router
from serve_app.services import Services
from tests.billing.conftest import REDIS_URL

runner = CliRunner()


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """The platform's SQLite, as `darkgpu admin` finds it (`DARKGPU_*`), migrated."""
    url = f"sqlite:///{tmp_path / 'platform.db'}"
    monkeypatch.setenv("DARKGPU_DATABASE_URL", url)
    monkeypatch.setenv("DARKGPU_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DARKGPU_CONFIG_DIR", str(tmp_path / "agent"))  # `darkgpu auth` saves
    eng = make_engine(url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def api_url(engine: Engine, tmp_path: Path) -> Iterator[str]:
    """The provider routes on a real HTTP server (the agent's client makes its own)."""
    token_file = tmp_path / "ray_auth_token"
    token_file.write_text("ray-cluster-token\n")
    services = Services.create({"database_url": str(engine.url), "redis_url": REDIS_URL})
    services.providers = ProviderPlatform(
        Settings(cluster_address="10.8.0.1:6380", ray_auth_token_path=token_file)
    )
    web = FastAPI()
    install_error_handlers(web)
    web.state.services = services
    web.include_router(router)
    server = uvicorn.Server(uvicorn.Config(web, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the provider routes did not start"
    [sock] = [s for srv in server.servers for s in srv.sockets]
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        services.db.dispose()


def darkgpu(*args: str, code: int = 0) -> tuple[str, str]:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result.stdout, result.stderr


def new_provider(engine: Engine) -> tuple[str, str]:
    owner = accounts.create_account(
        engine, None, load_plans(DEFAULT_PLANS_FILE), email="rigs@example.com"
    )
    made = registry.create_provider(engine, account_id=owner.id, name="garage")
    return made.provider.id, made.token


def test_a_revoked_token_can_no_longer_sign_in(engine: Engine, api_url: str) -> None:
    provider_id, first = new_provider(engine)
    issued = json.loads(
        darkgpu("admin", "provider", "tokens", "issue", "--provider", provider_id)[0]
    )
    second = issued["token"]
    assert issued["provider_id"] == provider_id and second.startswith("dgpp-")
    assert second != first
    for token in (first, second):  # issuing one leaves the others valid
        out, _ = darkgpu("auth", "--token", token, "--api-url", api_url)
        assert f"Signed in as provider {provider_id}" in out

    revoked = json.loads(
        darkgpu("admin", "provider", "tokens", "revoke", "--provider", provider_id)[0]
    )
    assert revoked == {"provider_id": provider_id, "revoked": 2}
    for token in (first, second):
        _, err = darkgpu("auth", "--token", token, "--api-url", api_url, code=1)
        assert "The platform refused the token" in err and "was revoked" in err, err
        with pytest.raises(registry.ProviderAuthError) as refused:
            registry.authenticate(engine, token)
        assert refused.value.code == "revoked_provider_token"

    again = json.loads(
        darkgpu("admin", "provider", "tokens", "issue", "--provider", provider_id)[0]
    )
    out, _ = darkgpu("auth", "--token", again["token"], "--api-url", api_url)
    assert f"Signed in as provider {provider_id}" in out
    assert json.loads(
        darkgpu("admin", "provider", "tokens", "revoke", "--provider", provider_id)[0]
    ) == {"provider_id": provider_id, "revoked": 1}  # the earlier two stay revoked


def test_an_unknown_provider_is_an_error(engine: Engine) -> None:
    for verb in ("issue", "revoke"):
        _, err = darkgpu("admin", "provider", "tokens", verb, "--provider", "prv_nobody", code=1)
        assert "error: No provider 'prv_nobody'." in err


def test_the_operator_approves_suspends_and_revokes_a_provider(
    engine: Engine, api_url: str
) -> None:
    """Signing up for a provider gives the cluster's Ray token to no one: `darkgpu auth`
    with a pending provider's token gets none until `admin provider approve`."""
    provider_id, token = new_provider(engine)
    out, _ = darkgpu("auth", "--token", token, "--api-url", api_url)
    assert "The provider is pending" in out and not creds.ray_token_path().exists()
    [listed] = json.loads(darkgpu("admin", "provider", "list", "--review", "pending")[0])
    assert listed["id"] == provider_id
    approved = json.loads(darkgpu("admin", "provider", "approve", "--provider", provider_id,
                                  "--note", "checked the rig")[0])  # fmt: skip
    assert approved["review"] == "approved"
    out, _ = darkgpu("auth", "--token", token, "--api-url", api_url)
    assert "pending" not in out and creds.ray_token_path().read_text() == "ray-cluster-token"
    suspended = json.loads(darkgpu("admin", "provider", "suspend", "--provider", provider_id)[0])
    assert suspended["review"] == "suspended"
    out, _ = darkgpu("auth", "--token", token, "--api-url", api_url)
    assert "The provider is suspended" in out and not creds.ray_token_path().exists()
    json.loads(darkgpu("admin", "provider", "revoke", "--provider", provider_id)[0])
    _, err = darkgpu("auth", "--token", token, "--api-url", api_url, code=1)
    assert "was revoked" in err
    _, err = darkgpu("admin", "provider", "approve", "--provider", provider_id, code=1)
    assert "stays revoked" in err
    assert json.loads(darkgpu("admin", "provider", "list", "--review", "pending")[0]) == []
