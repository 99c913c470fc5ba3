"""install.sh: its checks of the machine run for real with a stand-in `nvidia-smi` on PATH
(what the driver's tool prints); `--check` changes nothing. What it installs is seen through a
stand-in Python that records its pip commands (PyPI cannot be reached from here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "agent_bootstrap" / "install.sh"
UNIT = REPO / "configs" / "systemd" / "darkgpu-agent.service"

NVIDIA_SMI = """#!/bin/sh
if [ "$1" = "--query-gpu=name,memory.total,driver_version" ]; then
  printf '%s\\n' "{csv}"
  exit 0
fi
echo "| NVIDIA-SMI {driver}    Driver Version: {driver}    CUDA Version: {cuda}     |"
"""


# Says it is Python 3.12, makes "virtual environments" that are copies of itself, has no vLLM,
# and records every call it gets (pip, the config writer) in $PYTHON_LOG.
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$PYTHON_LOG"
case "$1 $2" in
  "-m venv") mkdir -p "$3/bin" && cp "$0" "$3/bin/python" ;;
  "-c import vllm"*) exit 1 ;;
  "-c import platform"*) echo 3.12.0 ;;
esac
"""
GOOD_SMI = "NVIDIA H100 80GB HBM3, 81559, 580.159.04"
# the release the tests run (on the CPU); providers' GPUs get its CUDA build
VLLM_RELEASE = re.search(r"^VLLM_RELEASE := (\S+)$", (REPO / "Makefile").read_text(), re.M)[1]


def run(
    tmp_path: Path, smi: str | None, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if smi is not None:
        tool = bin_dir / "nvidia-smi"
        tool.write_text(smi)
        tool.chmod(0o755)
    python_dir = Path(sys.executable).parent
    env = {
        "PATH": f"{bin_dir}:{python_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        **(env or {}),
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60
    )


def smi(csv: str, driver: str, cuda: str) -> str:
    return NVIDIA_SMI.format(csv=csv, driver=driver, cuda=cuda)


def test_the_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_a_good_machine_passes_the_check(tmp_path: Path) -> None:
    done = run(tmp_path, smi(GOOD_SMI, "580.159.04", "13.0"), "--check")
    assert done.returncode == 0, done.stderr
    assert "GPU: 1 x NVIDIA H100 80GB HBM3, 79 GiB, driver 580.159.04, CUDA 13.0" in done.stdout
    assert "can run the DarkGPU agent" in done.stdout
    assert not (tmp_path / "home").exists()  # --check changed nothing


@pytest.mark.parametrize(
    ("tool", "words"),
    [
        (None, "No NVIDIA driver found"),
        (smi("Tesla T4, 15360, 470.256.02", "470.256.02", "11.4"), "470.256.02 is too old"),
        (smi("NVIDIA GeForce RTX 4090, 24564, 535.54.03", "535.54.03", "11.8"), "CUDA 11.8"),
        ("#!/bin/sh\nexit 9\n", "is the NVIDIA driver loaded"),
    ],
)
def test_unfit_machines_are_refused_clearly(tmp_path: Path, tool: str | None, words: str) -> None:
    if tool is None and any(
        (Path(p) / "nvidia-smi").exists() for p in ("/usr/bin", "/bin")
    ):  # pragma: no cover - a machine with a driver
        pytest.skip("this machine has a real nvidia-smi")
    done = run(tmp_path, tool, "--check")
    assert done.returncode == 1
    assert words in done.stderr


@pytest.mark.parametrize(
    ("args", "agent", "vllm"),
    [
        ((), "darkgpu[serving]", True),
        (("--package", "darkgpu==0.2.0", "--skip-vllm"), "darkgpu[serving]==0.2.0", False),
        (("--package", "./dist/darkgpu-0.2.0-py3-none-any.whl"),
         "./dist/darkgpu-0.2.0-py3-none-any.whl[serving]", True),
        (("--package", "darkgpu[platform]"), "darkgpu[platform]", True),
    ],
)  # fmt: skip
def test_the_agent_is_installed_with_what_the_replicas_need(
    tmp_path: Path, args: tuple[str, ...], agent: str, vllm: bool
) -> None:
    """The agent alone needs none of the platform, but the node runs the model replicas in
    this environment: the `serving` extra goes with it, whatever SPEC names the package."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3.13").write_text(FAKE_PYTHON)
    (bin_dir / "python3.13").chmod(0o755)
    log = tmp_path / "python.log"
    done = run(
        tmp_path, smi(GOOD_SMI, "580.159.04", "13.0"), "--no-systemd", *args,
        env={"PYTHON_LOG": str(log)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    installs = [line for line in log.read_text().splitlines() if line.startswith("-m pip install")]
    assert installs[1] == f"-m pip install --quiet --upgrade {agent}"
    assert installs[2:] == ([f"-m pip install --quiet vllm=={VLLM_RELEASE}"] if vllm else [])
    assert f"Installing the agent and what the model replicas need ({agent})" in done.stdout


def test_unknown_options_are_refused(tmp_path: Path) -> None:
    done = run(tmp_path, None, "--frobnicate")
    assert done.returncode == 1 and "unknown option: --frobnicate" in done.stderr


def test_the_embedded_unit_is_the_repository_unit() -> None:
    text = SCRIPT.read_text()
    embedded = text.split("# BEGIN UNIT\n", 1)[1].split("# END UNIT\n", 1)[0]
    assert embedded == UNIT.read_text()
    assert "ExecStart=%h/.local/share/darkgpu-agent/venv/bin/darkgpu serve" in embedded
    assert os.access(SCRIPT, os.X_OK)


def test_a_provider_with_another_vllm_release_gets_the_tested_one(tmp_path: Path) -> None:
    """A GPU already running another vLLM release would serve an untested path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    other = FAKE_PYTHON.replace('"-c import vllm"*) exit 1', '"-c import vllm"*) echo 0.29.0')
    (bin_dir / "python3.13").write_text(other)
    (bin_dir / "python3.13").chmod(0o755)
    log = tmp_path / "python.log"
    done = run(tmp_path, smi(GOOD_SMI, "580.159.04", "13.0"), "--no-systemd",
               env={"PYTHON_LOG": str(log)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"-m pip install --quiet vllm=={VLLM_RELEASE}" in log.read_text().splitlines()
