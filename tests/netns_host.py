"""A host of the test's own on this machine: a network namespace joined to it by a veth pair.

From inside, this machine is reachable at one address only, `gateway_ip` (its end of the
pair): its loopback (where the control plane's servers listen) is not the namespace's, and
nothing routes anywhere else. Traffic stays on this machine. Needs root (`ip netns`).
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

POOL_USER = "darkgpu-pool"  # the unprivileged user a pool's head runs as in tests


@dataclass(frozen=True)
class NetnsHost:
    name: str  # the namespace's, and the stem of its veth pair's (15 characters at most)
    gateway_ip: str  # this machine's end of the pair
    ip: str  # the namespace's end

    @classmethod
    def for_port(cls, port: int) -> NetnsHost:
        """One per test port (runs with different port offsets get different ones)."""
        subnet = f"10.203.{port % 241}"
        return cls(f"dgh{port}", f"{subnet}.1", f"{subnet}.2")

    def create(self) -> None:
        self.delete()
        outside, inside = f"{self.name}a", f"{self.name}b"
        for command in (
            ["netns", "add", self.name],
            ["link", "add", outside, "type", "veth", "peer", "name", inside],
            ["link", "set", inside, "netns", self.name],
            ["addr", "add", f"{self.gateway_ip}/24", "dev", outside],
            ["link", "set", outside, "up"],
            ["-n", self.name, "addr", "add", f"{self.ip}/24", "dev", inside],
            ["-n", self.name, "link", "set", inside, "up"],
            ["-n", self.name, "link", "set", "lo", "up"],
        ):
            subprocess.run(["ip", *command], check=True, capture_output=True, timeout=30)

    def delete(self) -> None:
        """The namespace and the pair (gone with either end); nothing if neither is there."""
        for command in (["netns", "del", self.name], ["link", "del", f"{self.name}a"]):
            subprocess.run(["ip", *command], capture_output=True, timeout=30)

    def command(self, argv: Sequence[str], user: str | None = None) -> list[str]:
        """`argv` run inside the namespace, as `user` where one is named (with the environment
        it is given: HOME included)."""
        as_user = ["runuser", "--preserve-environment", "-u", user, "--"] if user else []
        return ["ip", "netns", "exec", self.name, *as_user, *argv]


def ensure_system_user(name: str) -> None:
    """An unprivileged system user without a home or a shell, made if missing."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], check=True, timeout=30)  # fmt: skip


@contextmanager
def reachable_by_others(paths: Iterable[Path]) -> Iterator[None]:
    """Every folder above `paths` lets other users through (search permission only, not
    listing) while this lasts, then has its own mode back: a checkout in a folder only root
    may enter (`mktemp -d` makes them 0700) is out of the pool's user's reach, and the pool's
    head runs this checkout's venv as that user. An operator installs the platform where
    the user reaches it."""
    opened: dict[Path, int] = {}
    for path in paths:
        for folder in (path.resolve(), *path.resolve().parents):
            mode = folder.stat().st_mode
            if folder not in opened and not mode & stat.S_IXOTH:
                opened[folder] = stat.S_IMODE(mode)
                os.chmod(folder, stat.S_IMODE(mode) | stat.S_IXOTH)
    try:
        yield
    finally:
        for folder, mode in opened.items():
            os.chmod(folder, mode)
