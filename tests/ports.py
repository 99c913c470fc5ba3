"""Ports of the test clusters. `DARKGPU_TEST_PORT_OFFSET` moves them all, so that two test
runs on one machine (say, two developers' checkouts) do not meet."""

from __future__ import annotations

import os

OFFSET = int(os.environ.get("DARKGPU_TEST_PORT_OFFSET", "0"))


def port(base: int) -> int:
    return base + OFFSET
