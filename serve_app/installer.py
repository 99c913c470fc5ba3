"""The provider installer this platform serves: `install.sh` pointed at this platform, and the
agent's wheel built from this repository.

`agent_wheel(settings)` builds the wheel once per source tree (the repository the platform
runs from: pyproject.toml and its packages, `pip wheel --no-deps --no-build-isolation
--no-index`, as tests/agent_bootstrap/test_packaging.py checks it) under
`<data_dir>/agent/<fingerprint>/`. Its unconditional requirements are the agent's only
(typer, httpx, pydantic, cryptography, nvidia-ml-py, ray): the platform's server
dependencies are the `platform` extra, which the installer never asks for.

`render_script(settings, wheel)` is agent_bootstrap/install.sh with its three served defaults
(`DEFAULT_API_URL`, `DEFAULT_PACKAGE`, `DEFAULT_WHEEL_SHA256`) set to this platform's URL, the
wheel's URL here and the wheel's SHA-256, each shell-quoted: the script downloads the wheel,
checks its hash before anything is installed, and signs the agent in to this platform.

The platform's URL is the operator's setting (`public_url`, else http://<http_host>:<http_port>),
never a request's Host header: a forged Host must not be able to make the platform serve a
script that points somewhere else (to a cache in front of it, or to anyone).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from core.settings import Settings
from kernel.errors import Unavailable

OWN_PACKAGES = ("kernel", "core", "billing", "cluster", "serve_app", "agent_bootstrap", "darkgpu")
SERVED_DEFAULTS = ("DEFAULT_API_URL", "DEFAULT_PACKAGE", "DEFAULT_WHEEL_SHA256")
WHEEL_PATH = "/install"  # the wheel is served at <platform>/install/<wheel file name>
BUILD_TIMEOUT_S = 300


class InstallerUnavailable(Unavailable):
    """The platform cannot build the agent's wheel (not run from a source tree, or the build
    failed): a 503 that says why."""

    code = "installer_unavailable"


@dataclass(frozen=True)
class AgentWheel:
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name


def source_root() -> Path | None:
    """The repository the platform runs from (None when installed from a wheel)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def _sources(root: Path) -> list[Path]:
    files = [root / "pyproject.toml"]
    for package in OWN_PACKAGES:
        files += sorted(
            p
            for p in (root / package).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        )
    return files


def fingerprint(root: Path) -> str:
    """A hash of what goes into the wheel: a changed source builds a new wheel."""
    digest = hashlib.sha256()
    for path in _sources(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:24]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_lock = threading.Lock()
_built: dict[tuple[Path, Path], AgentWheel] = {}


def agent_wheel(settings: Settings) -> AgentWheel:
    """The agent's wheel for this source tree, built on first use (blocking: call it from a
    thread). Raises InstallerUnavailable with the reason when it cannot be built."""
    root = source_root()
    if root is None:
        raise InstallerUnavailable(
            "The agent's wheel is built from the platform's source tree, which this "
            "installation does not have."
        )
    key = (root, settings.data_dir)
    with _lock:
        found = _built.get(key)
        if found is not None and found.path.is_file():
            return found
        out = settings.data_dir / "agent" / fingerprint(root)
        wheels = sorted(out.glob("darkgpu-*.whl"))
        if not wheels:
            _build(root, out)
            wheels = sorted(out.glob("darkgpu-*.whl"))
        if len(wheels) != 1:
            raise InstallerUnavailable(f"Expected one agent wheel in {out}, found {len(wheels)}.")
        _built[key] = AgentWheel(wheels[0], _sha256(wheels[0]))
        return _built[key]


def _build(root: Path, out: Path) -> None:
    """`pip wheel` a copy of the source (no build outputs of the checkout go in), then move
    the wheel into `out` in one rename, so a half-built wheel is never served."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        source = Path(tmp) / "src"
        source.mkdir()
        shutil.copy(root / "pyproject.toml", source / "pyproject.toml")
        for package in OWN_PACKAGES:
            shutil.copytree(
                root / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
            )
        dist = Path(tmp) / "dist"
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--no-index", "--quiet", "--wheel-dir", str(dist), str(source)],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False,
        )  # fmt: skip
        if built.returncode != 0:
            raise InstallerUnavailable(
                "Building the agent's wheel failed: " + (built.stderr.strip()[-500:] or "?")
            )
        staged = Path(tmp) / "staged"
        staged.mkdir()
        for wheel in dist.glob("darkgpu-*.whl"):
            shutil.move(str(wheel), staged / wheel.name)
        try:
            staged.rename(out)
        except OSError:  # another process built it meanwhile
            if not out.is_dir():
                raise


def script_template() -> str:
    return (importlib.resources.files("agent_bootstrap") / "install.sh").read_text()


def render_script(settings: Settings, wheel: AgentWheel, template: str | None = None) -> str:
    """install.sh with this platform's defaults; every other line as it is."""
    base = settings.base_url
    values = {
        "DEFAULT_API_URL": base,
        "DEFAULT_PACKAGE": f"{base}{WHEEL_PATH}/{wheel.name}",
        "DEFAULT_WHEEL_SHA256": wheel.sha256,
    }
    lines = (template if template is not None else script_template()).splitlines(keepends=True)
    seen = set()
    for i, line in enumerate(lines):
        name = line.split("=", 1)[0]
        if name in values and name not in seen:
            lines[i] = f"{name}={shlex.quote(values[name])}\n"
            seen.add(name)
    if seen != set(values):
        missing = ", ".join(sorted(set(values) - seen))
        raise InstallerUnavailable(f"install.sh has no line for {missing}.")
    return "".join(lines)
