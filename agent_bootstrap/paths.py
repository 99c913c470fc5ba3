"""Where the agent keeps its files (`~/.config/darkgpu/`), written private (0600 in 0700)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

CONFIG_FILE = "provider.toml"
KEY_FILE = "x25519.key"
CREDENTIALS_FILE = "credentials.json"
RAY_TOKEN_FILE = "ray_auth_token"


def config_dir() -> Path:
    """`$DARKGPU_CONFIG_DIR`, else `$XDG_CONFIG_HOME/darkgpu`, else `~/.config/darkgpu`."""
    explicit = os.environ.get("DARKGPU_CONFIG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or "~/.config"
    return Path(base).expanduser() / "darkgpu"


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def write_private(path: Path, data: bytes | str) -> None:
    """Write `path` with mode 0600, atomically (a temporary file renamed over it)."""
    ensure_private_dir(path.parent)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_private(path: Path, data: bytes) -> bool:
    """Create `path` (0600) only if it does not exist: never overwrites. True if created."""
    ensure_private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777
