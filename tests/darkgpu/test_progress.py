"""What `darkgpu up` shows while it works (`darkgpu.progress`): the steps with their times on
the terminal, and everything else the process and its children print in the log file it
names; a failed step says so and the error goes on up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import logging, subprocess, sys
from pathlib import Path
from darkgpu.progress import Progress, captured

with captured(Path(sys.argv[1])) as terminal:
    progress = Progress(terminal)
    with progress.step("Redis"):
        print('{"levelname": "INFO", "message": "a library logs JSON"}')
        logging.getLogger("alembic").warning("Running upgrade 0001 -> 0002")
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('child err\\\\n')"])
    progress.note("llm-tiny: 1 loading")
    try:
        with progress.step("Ray head"):
            raise RuntimeError("port taken")
    except RuntimeError:
        pass
print("after the capture")
"""


def test_steps_reach_the_terminal_and_the_rest_the_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "up.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert (
        [line[10:] for line in lines[:-1]]
        == [
            "… Redis",
            lines[1][10:],  # its time varies
            "  llm-tiny: 1 loading",
            "… Ray head",
            lines[4][10:],
        ]
    )
    assert lines[1].endswith(" s)") and "✓ Redis (" in lines[1]
    assert "✗ Ray head: failed after" in lines[4]
    assert lines[-1] == "after the capture"  # the terminal is back
    assert all(line.startswith("[") and line[7:9] == "s]" for line in lines[:-1])
    written = log.read_text()
    assert '"message": "a library logs JSON"' in written and "child err" in written
    assert "Running upgrade 0001 -> 0002" in written
    assert "{" not in done.stdout and done.stderr == ""


def test_a_failed_step_raises_after_saying_so() -> None:
    from io import StringIO

    from darkgpu.progress import Progress

    out = StringIO()
    ticks = iter([0.0, 1.0, 1.0, 3.5, 3.5])  # start; the step begins, says so; fails, says so
    progress = Progress(out, clock=lambda: next(ticks))
    with pytest.raises(ValueError), progress.step("Database migrated"):
        raise ValueError("no such table")
    assert out.getvalue().splitlines() == [
        "[   1.0s] … Database migrated",
        "[   3.5s] ✗ Database migrated: failed after 2.5 s",
    ]
