"""GPU facts that the agent reports and the platform stores: units and the CC state."""

from __future__ import annotations

from enum import StrEnum

GIB = 1024**3


class CcState(StrEnum):
    """NVIDIA Confidential Computing as NVML reports it."""

    unknown = "unknown"  # not reported yet
    unsupported = "unsupported"  # no CC: consumer and pre-Hopper GPUs, or an old driver
    off = "off"  # CC-capable, CC mode off
    on = "on"  # CC mode on
    devtools = "devtools"  # CC dev-tools mode: no confidentiality, never `verified`
