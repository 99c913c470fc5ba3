"""The GPUs of this machine, read with NVML (agent_bootstrap.nvml); none without a driver."""

from __future__ import annotations

from dataclasses import dataclass

from agent_bootstrap.nvml import GpuReader, NvmlReader
from kernel.gpu import GIB

__all__ = ["GIB", "GPU", "local_gpus"]


@dataclass(frozen=True)
class GPU:
    name: str
    vram_gb: int  # to the nearest GiB, as the `vram_gb` resource counts it (agent_bootstrap.nvml)


def local_gpus(reader: GpuReader | None = None) -> list[GPU]:
    """The GPUs NVML sees, or none when nvidia-ml-py, NVML or its driver is missing."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        reading = (reader or NvmlReader()).read()
    except pynvml.NVMLError:
        return []
    return [GPU(name=d.name, vram_gb=round(d.vram_gib)) for d in reading.devices]
