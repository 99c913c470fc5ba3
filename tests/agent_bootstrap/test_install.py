"""install.sh: its checks of the machine run for real with a stand-in `nvidia-smi` on PATH
(what the driver's tool prints); `--check` changes nothing."""

from __future__ import annotations

import os
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


def run(tmp_path: Path, smi: str | None, *args: str) -> subprocess.CompletedProcess[str]:
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
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60
    )


def smi(csv: str, driver: str, cuda: str) -> str:
    return NVIDIA_SMI.format(csv=csv, driver=driver, cuda=cuda)


def test_the_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_a_good_machine_passes_the_check(tmp_path: Path) -> None:
    done = run(
        tmp_path, smi("NVIDIA H100 80GB HBM3, 81559, 580.159.04", "580.159.04", "13.0"), "--check"
    )
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


def test_unknown_options_are_refused(tmp_path: Path) -> None:
    done = run(tmp_path, None, "--frobnicate")
    assert done.returncode == 1 and "unknown option: --frobnicate" in done.stderr


def test_the_embedded_unit_is_the_repository_unit() -> None:
    text = SCRIPT.read_text()
    embedded = text.split("# BEGIN UNIT\n", 1)[1].split("# END UNIT\n", 1)[0]
    assert embedded == UNIT.read_text()
    assert "ExecStart=%h/.local/share/darkgpu-agent/venv/bin/darkgpu serve" in embedded
    assert os.access(SCRIPT, os.X_OK)
