"""Idle detection: is someone else using the GPU? Pause at once; rejoin after a quiet spell.

NVML lists the processes running on each GPU. Ours are the Ray and vLLM processes the
agent's node runs: a process whose command line starts with `ray::` (Ray workers, and so the
vLLM engine inside a replica), Ray's own daemons (`raylet`, `gcs_server`), or any descendant
of those or of the agent itself. Desktop compositors (Xorg, gnome-shell, …) always hold a
little VRAM and never count, nor do names in `ignore_processes`. Anything else is "another
user's process", whoever owns it: the provider playing a game counts, which is the point.

A process NVML lists but /proc does not show (another PID namespace: the agent in a
container without `--pid=host`) counts as foreign: the owner's use wins over earnings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent_bootstrap.nvml import GpuProcess

COMPOSITORS = frozenset(
    {
        "Xorg",
        "X",
        "Xwayland",
        "gnome-shell",
        "kwin_x11",
        "kwin_wayland",
        "plasmashell",
        "mutter",
        "sway",
        "weston",
        "dwm",
        "i3",
        "Hyprland",
        "cinnamon",
        "xfwm4",
    }
)
RAY_DAEMONS = frozenset({"raylet", "gcs_server", "dashboard", "plasma_store"})
_MAX_DEPTH = 64


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    uid: int
    name: str
    cmdline: str


class ProcTable(Protocol):
    def get(self, pid: int) -> ProcInfo | None: ...


class LinuxProcTable:
    """Reads `/proc/<pid>/status` and `/proc/<pid>/cmdline`."""

    def __init__(self, root: Path = Path("/proc")) -> None:
        self._root = root

    def get(self, pid: int) -> ProcInfo | None:
        base = self._root / str(pid)
        try:
            status = (base / "status").read_text()
            cmdline = (base / "cmdline").read_bytes()
        except OSError:
            return None
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        try:
            ppid = int(fields.get("PPid", "0").strip())
            uid = int(fields.get("Uid", "-1").split()[0])
        except (ValueError, IndexError):
            return None
        return ProcInfo(
            pid=pid,
            ppid=ppid,
            uid=uid,
            name=fields.get("Name", "").strip(),
            cmdline=cmdline.replace(b"\0", b" ").decode(errors="replace").strip(),
        )


def _ours_by_itself(info: ProcInfo, own_pids: set[int]) -> bool:
    return (
        info.pid in own_pids
        or info.cmdline.startswith("ray::")
        or info.name in RAY_DAEMONS
        or "ray/core/src/ray/raylet" in info.cmdline
    )


def is_ours(pid: int, procs: ProcTable, own_pids: set[int]) -> bool:
    """Whether `pid` is one of the agent's node's processes (or their descendant)."""
    seen: set[int] = set()
    current = procs.get(pid)
    for _ in range(_MAX_DEPTH):
        if current is None or current.pid in seen:
            return False
        if _ours_by_itself(current, own_pids):
            return True
        seen.add(current.pid)
        if current.ppid <= 1:
            return False
        current = procs.get(current.ppid)
    return False


@dataclass(frozen=True)
class Classified:
    ours: tuple[GpuProcess, ...]
    foreign: tuple[tuple[GpuProcess, ProcInfo | None], ...]
    ignored: tuple[GpuProcess, ...]

    def describe_foreign(self) -> str:
        parts = []
        for proc, info in self.foreign:
            parts.append(f"{info.name} (pid {proc.pid})" if info else f"pid {proc.pid}")
        return ", ".join(parts)


def classify(
    processes: Iterable[GpuProcess],
    procs: ProcTable,
    *,
    own_pids: set[int],
    ignore_names: Iterable[str] = (),
) -> Classified:
    ignore = COMPOSITORS | set(ignore_names)
    ours, foreign, ignored = [], [], []
    for proc in processes:
        info = procs.get(proc.pid)
        if info is not None and info.name in ignore:
            ignored.append(proc)
        elif info is not None and is_ours(proc.pid, procs, own_pids):
            ours.append(proc)
        else:
            foreign.append((proc, info))
    return Classified(tuple(ours), tuple(foreign), tuple(ignored))


class IdleDetector:
    """Busy the moment a foreign process shows; free again once none has shown for
    `rejoin_after_s`. Before anything was ever seen busy, the GPU counts as idle."""

    def __init__(self, rejoin_after_s: float) -> None:
        self.rejoin_after_s = rejoin_after_s
        self._idle_since = -math.inf

    def update(self, busy: bool, now: float) -> bool:
        """Record what was seen at `now` (seconds); whether the GPU may serve now."""
        if busy:
            self._idle_since = math.nan
            return False
        if math.isnan(self._idle_since):
            self._idle_since = now
        return now - self._idle_since >= self.rejoin_after_s

    def rejoin_in(self, now: float) -> float | None:
        """Seconds until the GPU may serve again (None while busy, 0 when it may)."""
        if math.isnan(self._idle_since):
            return None
        return max(0.0, self.rejoin_after_s - (now - self._idle_since))
