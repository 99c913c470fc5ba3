"""What `darkgpu up` shows: each step on its own line with the time since the start, and
where the third-party logs went.

While it runs, everything the process and its children write to stdout and stderr (Ray,
Serve, Alembic, vLLM, Redis) goes to a log file (`captured`), and the steps alone reach the
terminal. On a failure the step says what failed, in words, and names that file.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


class Progress:
    def __init__(self, out: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self._out = out
        self._clock = clock
        self._started = clock()

    def elapsed(self) -> float:
        return self._clock() - self._started

    def line(self, mark: str, text: str) -> None:
        self._out.write(f"[{self.elapsed():6.1f}s] {mark} {text}\n")
        self._out.flush()

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """`what` starts; a line when it is done or fails (then the error goes on up)."""
        began = self._clock()
        self.line("…", what)
        try:
            yield
        except BaseException:
            self.line("✗", f"{what}: failed after {self._clock() - began:.1f} s")
            raise
        self.line("✓", f"{what} ({self._clock() - began:.1f} s)")

    def note(self, text: str) -> None:
        """Progress inside a step (a replica's state)."""
        self.line(" ", text)


@contextmanager
def captured(log_path: Path) -> Iterator[TextIO]:
    """Point file descriptors 1 and 2 (this process's and every child's) at `log_path`, and
    yield the terminal's stdout for the progress lines."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8")
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            terminal.close()
