"""The installer the platform serves (issue 14): `curl <platform>/install.sh | bash` on a
clean machine fetches the agent's wheel built from this repository (checked by its SHA-256),
then refuses clearly where there is no NVIDIA driver; the script names this platform (from
its settings, never a request's Host header) and only the agent's wheel is served."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from core.settings import Settings
from serve_app import installer
from serve_app.http_app import create_app
from serve_app.services import Services
from tests.agent_bootstrap.test_install import GOOD_SMI, VLLM_RELEASE, smi
from tests.billing.conftest import REDIS_URL

AGENT_REQUIREMENTS = {"typer", "httpx", "pydantic", "cryptography", "nvidia-ml-py", "ray"}
HAS_DRIVER = any((Path(p) / "nvidia-smi").exists() for p in ("/usr/bin", "/bin"))


@dataclass
class Platform:
    url: str
    services: Services
    client: TestClient


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """The platform's HTTP app on a real server, its public URL set to where it listens (one
    data directory for the module's tests: the wheel is built once)."""
    sock = _free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    services = Services.create(
        {
            "data_dir": str(tmp_path_factory.getbasetemp() / "install-data"),
            "redis_url": REDIS_URL,
            "state_redis_url": REDIS_URL,
            "public_url": url,
            "metrics_port": _free_socket().getsockname()[1],
        }
    )
    app = create_app(services)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the test server never started"
        time.sleep(0.05)
    with TestClient(app) as client:
        yield Platform(url, services, client)
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()
    services.db.dispose()


# A Python that records what it is asked and runs it, except what needs PyPI (pip) or makes
# an environment (a copy of itself); the script's own checks and its config writer run for real.
RECORDING_PYTHON = """#!/bin/sh
echo "$*" >> "$PYTHON_LOG"
case "$1 $2" in
  "-m venv") mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0 ;;
  "-m pip") exit 0 ;;
  "-c import vllm"*) exit 1 ;;
esac
exec "$REAL_PYTHON" "$@"
"""


def curl_bash(
    platform: Platform, home: Path, *args: str, path: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """What a provider types, in a clean home: PATH has the system's tools and a Python 3.11+
    (this one), no nvidia-smi (unless `path` adds one)."""
    env = {
        "PATH": f"{path}{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(home),
        **(env or {}),
    }
    command = f"curl -fsSL {platform.url}/install.sh | bash -s -- " + " ".join(args)
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def defaults(script: str) -> dict[str, str]:
    """The served defaults, as bash reads them."""
    lines = [line for line in script.splitlines() if line.startswith(installer.SERVED_DEFAULTS)]
    shown = subprocess.run(
        ["bash", "-c", "\n".join([*lines, *(f'printf "%s\\0" "${n}"' for n in
                                            installer.SERVED_DEFAULTS)])],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return dict(zip(installer.SERVED_DEFAULTS, shown.stdout.split("\0")[:-1], strict=True))


@pytest.mark.skipif(HAS_DRIVER, reason="this machine has an NVIDIA driver")
def test_the_served_installer_runs_until_the_driver_check(
    platform: Platform, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    done = curl_bash(platform, home)
    assert done.returncode == 1, done.stdout + done.stderr
    # it ends at the clear refusal ...
    assert done.stderr.strip().splitlines()[-1] == (
        "darkgpu install: No NVIDIA driver found (nvidia-smi is missing). "
        "Install the NVIDIA driver 535 or newer first."
    )
    assert "Traceback" not in done.stderr
    # ... with everything before it done: Python found, this platform's wheel downloaded and
    # checked
    wheel = installer.agent_wheel(platform.services.settings)
    assert "Python: " in done.stdout
    assert f"Downloading the agent: {platform.url}/install/{wheel.name}" in done.stdout
    fetched = home / ".local/share/darkgpu-agent/dist" / wheel.name
    assert f"Agent: {fetched} (SHA-256 verified)" in done.stdout
    assert hashlib.sha256(fetched.read_bytes()).hexdigest() == wheel.sha256
    # and nothing after it: no environment, no config
    assert sorted(p.name for p in (home / ".local/share/darkgpu-agent").iterdir()) == ["dist"]
    assert not (home / ".config").exists() and not (home / ".local/bin").exists()
    # the wheel is the agent's: every package of the repository, the agent's requirements only
    with zipfile.ZipFile(fetched) as archive:
        names = set(archive.namelist())
        [meta] = [n for n in names if n.endswith(".dist-info/METADATA")]
        info = Parser().parsestr(archive.read(meta).decode())
    assert {"agent_bootstrap/cli.py", "serve_app/models.py", "kernel/money.py"} <= names
    requires = [Requirement(r) for r in info.get_all("Requires-Dist")]
    assert {canonicalize_name(r.name) for r in requires if r.marker is None} == AGENT_REQUIREMENTS


def test_on_a_gpu_the_served_installer_installs_that_wheel_and_the_pinned_vllm(
    platform: Platform, tmp_path: Path
) -> None:
    """Past the driver check (a stand-in nvidia-smi), the script installs the wheel it
    verified, with the replicas' extra, and the vLLM release the tests run, and writes a
    config that names this platform."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    for name, text in (("nvidia-smi", smi(GOOD_SMI, "580.159.04", "13.0")),
                       ("python3.13", RECORDING_PYTHON)):  # fmt: skip
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "python.log"
    done = curl_bash(
        platform, home, "--no-systemd", path=f"{bin_dir}:",
        env={"PYTHON_LOG": str(log), "REAL_PYTHON": sys.executable},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    wheel = installer.agent_wheel(platform.services.settings)
    fetched = home / ".local/share/darkgpu-agent/dist" / wheel.name
    installs = [line for line in log.read_text().splitlines() if line.startswith("-m pip install")]
    assert installs == [
        "-m pip install --quiet --upgrade pip",
        f"-m pip install --quiet --upgrade {fetched}[serving]",
        f"-m pip install --quiet vllm=={VLLM_RELEASE}",
    ]
    assert "GPU: 1 x NVIDIA H100 80GB HBM3" in done.stdout
    config = (home / ".config/darkgpu/provider.toml").read_text()
    assert f'api_url = "{platform.url}"' in config


def test_a_download_that_does_not_match_is_not_installed(
    platform: Platform, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    tampered = curl_bash(platform, home, "--wheel-sha256", "0" * 64)
    assert tampered.returncode == 1
    assert f", not {'0' * 64}: not installed." in tampered.stderr
    assert list((home / ".local/share/darkgpu-agent/dist").iterdir()) == []  # .part removed
    unchecked = curl_bash(platform, home, "--wheel-sha256", "''")
    assert unchecked.returncode == 1
    assert "an unchecked download is not installed" in unchecked.stderr


def test_the_script_names_this_platform_whatever_the_host_header(platform: Platform) -> None:
    served = platform.client.get("/install.sh", headers={"host": "evil.example"})
    assert served.status_code == 200
    assert served.headers["content-type"].startswith("text/x-shellscript")
    wheel = installer.agent_wheel(platform.services.settings)
    assert defaults(served.text) == {
        "DEFAULT_API_URL": platform.url,
        "DEFAULT_PACKAGE": f"{platform.url}/install/{wheel.name}",
        "DEFAULT_WHEEL_SHA256": wheel.sha256,
    }
    assert "evil.example" not in served.text
    assert subprocess.run(["bash", "-n"], input=served.text, text=True).returncode == 0
    # everything but the three defaults is the repository's script
    template = installer.script_template().splitlines()
    ours = served.text.splitlines()
    assert len(ours) == len(template)
    changed = [a for a, b in zip(ours, template, strict=True) if a != b]
    assert [line.split("=", 1)[0] for line in changed] == list(installer.SERVED_DEFAULTS)


def test_an_odd_public_url_is_quoted_not_run(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, public_url="https://x.test/'$(touch /tmp/pwned-h4)'`id`")
    wheel = installer.AgentWheel(tmp_path / "darkgpu-0.1.0-py3-none-any.whl", "ab" * 32)
    script = installer.render_script(settings, wheel)
    assert defaults(script)["DEFAULT_API_URL"] == "https://x.test/'$(touch /tmp/pwned-h4)'`id`"
    assert not Path("/tmp/pwned-h4").exists()
    with pytest.raises(installer.InstallerUnavailable, match="DEFAULT_WHEEL_SHA256"):
        installer.render_script(settings, wheel, template="DEFAULT_API_URL=x\nDEFAULT_PACKAGE=y\n")


def test_only_the_agents_wheel_is_served(platform: Platform) -> None:
    wheel = installer.agent_wheel(platform.services.settings)
    got = platform.client.get(f"/install/{wheel.name}")
    assert got.status_code == 200
    assert hashlib.sha256(got.content).hexdigest() == wheel.sha256
    for name in ("darkgpu-9.9.9-py3-none-any.whl", "..%2F..%2Fpyproject.toml", "core.db"):
        refused = platform.client.get(f"/install/{name}")
        assert refused.status_code == 404, name
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert platform.client.get("/install/../pyproject.toml").status_code == 404


def test_a_platform_without_its_source_says_so(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(installer, "source_root", lambda: None)
    monkeypatch.setattr(installer, "_built", {})
    refused = platform.client.get("/install.sh")
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "installer_unavailable"
