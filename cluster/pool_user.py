"""The local pool's head as an unprivileged user of its own (`Settings.pool_user`).

Every member of a Ray cluster can run code on every node of it, its head included. Started as
`darkgpu up`'s own user, that code reads what that user reads: the data directory (the
control plane's Ray token, the Redis users' passwords, the SQLite database) and the
environment of every process of that user. As a user of its own, with a home of its own in
the temporary directory (Ray's session files, a copy of the pool's Ray token, which every
member holds anyway), it reads none of it. `darkgpu up` runs as root to start it so.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN_FILE = "ray_auth_token"


class PoolUserError(RuntimeError):
    """The pool's head cannot run as the configured user; the message says why and what to do."""


@dataclass(frozen=True)
class PoolUser:
    name: str
    uid: int
    gid: int
    home: Path  # its own, mode 0700: Ray's temporary directory, its copy of the token

    @classmethod
    def named(cls, name: str, port: int) -> PoolUser:
        """The user, checked: it exists, it is not root, and this process may become it."""
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise PoolUserError(
                f"pool_user {name!r} does not exist: create it with `useradd --system "
                f"--no-create-home --shell /usr/sbin/nologin {name}`"
            ) from None
        if entry.pw_uid == 0:
            raise PoolUserError(f"pool_user {name!r} is root: name an unprivileged user")
        if os.geteuid() != 0:
            raise PoolUserError(f"pool_user {name!r} is set: `darkgpu up` must run as root")
        home = Path(tempfile.gettempdir()) / f"darkgpu-pool-{port}"
        return cls(name, entry.pw_uid, entry.pw_gid, home)

    @property
    def ray_temp_dir(self) -> Path:
        return self.home / "ray"

    @property
    def token_path(self) -> Path:
        return self.home / TOKEN_FILE

    def process_options(self) -> dict[str, Any]:
        """`subprocess` arguments that start a process as this user, in its home."""
        return {"user": self.uid, "group": self.gid, "extra_groups": [], "cwd": self.home}

    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
                "RAY_AUTH_TOKEN_PATH": str(self.token_path)}  # fmt: skip

    def prepare(self, token: Path) -> None:
        """Its home, and in it its copy of the pool's Ray token; then a check that it can run
        this Python (a venv whose interpreter lies under a directory only root enters, such as
        /root, cannot serve as another user)."""
        self._make_home()
        # the home is the user's: whatever it left at this name (a link to a file of root's)
        # is removed, never written through
        self.token_path.unlink(missing_ok=True)
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchown(f.fileno(), self.uid, self.gid)
            f.write(token.read_text())
        try:
            probe = subprocess.run([sys.executable, "-c", "import ray"], capture_output=True,
                                   text=True, timeout=120, env={"PATH": os.defpath, **self.env()},
                                   **self.process_options())  # fmt: skip
            why = probe.stderr.strip()[-300:] if probe.returncode != 0 else ""
        except OSError as exc:
            why = str(exc)
        if why:
            raise PoolUserError(
                f"pool_user {self.name!r} cannot run {sys.executable} "
                f"({os.path.realpath(sys.executable)}): install the platform with an interpreter "
                f"every user can run, e.g. `make install PYTHON=/usr/bin/python3.11`. {why}"
            )

    def _make_home(self) -> None:
        try:
            self.home.mkdir(mode=0o700)
        except FileExistsError:
            pass
        found = os.lstat(self.home)
        # a directory anyone could have made first in the temporary directory: only one that is
        # a real directory, this user's or root's own, is taken
        if not stat.S_ISDIR(found.st_mode) or found.st_uid not in (0, self.uid):
            raise PoolUserError(f"{self.home} is not a directory of root's or {self.name}'s")
        os.chown(self.home, self.uid, self.gid, follow_symlinks=False)
        os.chmod(self.home, 0o700, follow_symlinks=False)
