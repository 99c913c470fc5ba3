"""Shared fixtures. The platform (a real Ray head, Serve, vLLM on the CPU) starts once per
test session, through the README's own command (`darkgpu up`), on ports of its own."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.settings import REPO_ROOT
from tests.billing.fake_stripe import API_KEY, WEBHOOK_SECRET, FakeStripe, serve
from tests.netns_host import POOL_USER, ensure_system_user, reachable_by_others
from tests.ports import port

BIN = Path(sys.executable).parent
# Tests that build their settings without naming a state Redis use their test Redis database
# for it too (one server may hold both roles: its noeviction then covers the state keys); the
# platform fixture, and the tests of the two roles, run a state Redis of their own.
os.environ.setdefault(
    "DARKGPU_STATE_REDIS_URL",
    os.environ.get("DARKGPU_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"),
)
_emails = itertools.count(1)
# Run first, before the session's shared platform starts: its three Ray clusters, six
# provider nodes and their vLLM engines, beside that platform, took this 24 GB machine past
# Ray's memory monitor's 95% (it killed both control planes' replicas).
FIRST = "tests/serve_app/test_multinode.py::"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))  # stable: the rest as found


@dataclass(frozen=True)
class Platform:
    env: dict[str, str]
    api_url: str
    metrics_url: str
    stripe: FakeStripe  # Stripe's API as the platform sees it (over HTTP), for payments

    def darkgpu(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "darkgpu"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def admin(self, *args: str) -> dict:
        """`darkgpu admin …`, as an operator runs it; its JSON answer."""
        done = self.darkgpu("admin", *args, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def new_key(self, plan: str = "free", usd: str | None = None) -> tuple[int, str]:
        """A new account on `plan` (with `usd` of credits granted) and an API key of it."""
        account = self.admin("account", "create", "--email", f"user{next(_emails)}@example.com",
                             "--plan", plan)  # fmt: skip
        if usd is not None:
            self.admin("credits", "grant", "--account", str(account["id"]), "--usd", usd)
        key = self.admin("key", "create", "--account", str(account["id"]))
        return account["id"], key["key"]


@pytest.fixture(scope="session")
def pool_user() -> Iterator[str]:
    """The unprivileged user a pool's head runs as in tests (`Settings.pool_user`): made if
    missing, and able to reach this checkout and its venv for the session."""
    ensure_system_user(POOL_USER)
    with reachable_by_others([REPO_ROOT, Path(sys.prefix)]):
        yield POOL_USER


@pytest.fixture(scope="session")
def fake_stripe() -> Iterator[tuple[FakeStripe, str]]:
    """Stripe's API cannot be reached from here: a fake that answers like it, over HTTP."""
    fake = FakeStripe(available_cents=10**8)
    with serve(fake) as url:
        yield fake, url


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory, fake_stripe) -> Iterator[Platform]:
    ports = {"RAY_PORT": port(6390), "HTTP_PORT": port(8010), "METRICS_PORT": port(8090),
             "DASHBOARD_PORT": port(8275), "POOL_RAY_PORT": port(6394),
             "POOL_HTTP_PORT": port(8011), "POOL_METRICS_PORT": port(8091),
             "POOL_DASHBOARD_PORT": port(8276)}  # fmt: skip
    # The money and the state Redis on ports where nothing runs: `darkgpu up` starts its own
    # there, as on a bare machine; SQL is the default SQLite under the data directory.
    env = {**os.environ, "DARKGPU_DATA_DIR": str(tmp_path_factory.mktemp("darkgpu"))}
    env.update({f"DARKGPU_{k}": str(v) for k, v in ports.items()})
    # The basic pool only: an empty verified pool's Ray head, Serve and gateway cost about
    # 1.6 GB for the whole session; the verified pool is tested in the multi-node suite.
    env["DARKGPU_POOL_TIERS"] = '["basic"]'
    env["DARKGPU_REDIS_URL"] = f"redis://127.0.0.1:{port(6392)}/0"
    env["DARKGPU_STATE_REDIS_URL"] = f"redis://127.0.0.1:{port(6393)}/0"
    env.pop("DARKGPU_DATABASE_URL", None)
    env.update(DARKGPU_STRIPE_SECRET_KEY=API_KEY, DARKGPU_STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
               DARKGPU_STRIPE_API_BASE=fake_stripe[1])  # fmt: skip
    platform = Platform(
        env=env,
        api_url=f"http://127.0.0.1:{ports['HTTP_PORT']}/v1",
        metrics_url=f"http://127.0.0.1:{ports['METRICS_PORT']}/metrics",
        stripe=fake_stripe[0],
    )
    started = platform.darkgpu("up")
    if started.returncode != 0:
        platform.darkgpu("down")
        pytest.fail(f"darkgpu up failed:\n{started.stdout}\n{started.stderr[-4000:]}")
    assert platform.api_url in started.stdout
    assert platform.api_url.removesuffix("/v1") + "/console" in started.stdout
    # each step with its time, each deployment's replicas to ready; the rest in its log
    shown = started.stdout
    for step in ("✓ Database migrated", "✓ Ray head (basic pool) on",
                 "✓ Ray head (control plane) on", "✓ Supply pool's gateway deployed (basic pool)",
                 "✓ Serve application deployed", "llm-darkgpu-tiny: 1 ready",
                 "ingress: 1 ready"):  # fmt: skip
        assert step in shown, shown
    assert not [line for line in shown.splitlines() if line.lstrip().startswith("{")], shown
    assert "redis://" not in shown and "password" not in shown.lower()  # no credentials
    assert "logs/up.log" in shown
    try:
        yield platform
    finally:
        platform.darkgpu("down")
