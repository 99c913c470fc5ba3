"""A process table the tests write by hand: what `/proc` would show, without the machine's
own processes, so idle detection sees exactly the processes a test names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from agent_bootstrap.idle import ProcInfo


class StaticProcTable:
    """A fixed process table (an `agent_bootstrap.idle.ProcTable`)."""

    def __init__(self, procs: Iterable[ProcInfo] | Mapping[int, ProcInfo]) -> None:
        items = procs.values() if isinstance(procs, Mapping) else procs
        self._procs = {p.pid: p for p in items}

    def get(self, pid: int) -> ProcInfo | None:
        return self._procs.get(pid)
