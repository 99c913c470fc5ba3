"""The GPUs of this machine, read with NVML (nvidia-ml-py); none where there is no driver."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    vram_gb: int


def local_gpus() -> list[GPU]:
    """The GPUs NVML sees, or none when NVML or its driver is missing."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                GPU(
                    name=name if isinstance(name, str) else name.decode(),
                    vram_gb=int(memory.total // GIB),
                )
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()
