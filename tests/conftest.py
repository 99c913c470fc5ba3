"""Shared fixtures. The platform (a real Ray head, Serve, vLLM on the CPU) starts once per
test session, through the README's own command (`darkgpu up`), on ports of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Platform:
    env: dict[str, str]
    api_url: str
    metrics_url: str

    def darkgpu(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "darkgpu"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    ports = {"RAY_PORT": "6390", "HTTP_PORT": "8010", "METRICS_PORT": "8090",
             "DASHBOARD_PORT": "8275"}  # fmt: skip
    env = {**os.environ, "DARKGPU_DATA_DIR": str(tmp_path_factory.mktemp("darkgpu"))}
    env.update({f"DARKGPU_{k}": v for k, v in ports.items()})
    platform = Platform(
        env=env,
        api_url=f"http://127.0.0.1:{ports['HTTP_PORT']}/v1",
        metrics_url=f"http://127.0.0.1:{ports['METRICS_PORT']}/metrics",
    )
    started = platform.darkgpu("up")
    if started.returncode != 0:
        platform.darkgpu("down")
        pytest.fail(f"darkgpu up failed:\n{started.stdout}\n{started.stderr[-4000:]}")
    assert platform.api_url in started.stdout
    try:
        yield platform
    finally:
        platform.darkgpu("down")
