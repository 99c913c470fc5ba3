"""NVML readings recorded on real machines (RUNTIME-FACTS.md), and variations of them."""

from __future__ import annotations

from dataclasses import replace

import pynvml

from agent_bootstrap.nvml import CcReading, DeviceReading, GpuProcess, GpuReading, with_processes

MIB = 1024**2

# nvidia-ml-py on an H100 host: idle, CC-capable with CC off (environment 0, ccFeature 0,
# gpusCaps 1, ready state 0).
H100 = GpuReading(
    driver_version="580.159.04",
    cuda_driver_version=13000,
    devices=(
        DeviceReading(
            index=0,
            name="NVIDIA H100 80GB HBM3",
            uuid="GPU-5c3d7a2e-0b1f-4e43-9d7e-6a1c2b3d4e5f",
            memory_total_bytes=81559 * MIB,  # 79.6 GiB
        ),
    ),
    cc=CcReading(environment=0, cc_feature=0, devtools_mode=0, gpus_caps=1, gpus_ready=0),
)

# The same machine booted into a confidential VM with CC on (production environment).
H100_CC_ON = replace(
    H100, cc=CcReading(environment=2, cc_feature=1, devtools_mode=0, gpus_caps=1, gpus_ready=1)
)
H100_CC_DEVTOOLS = replace(
    H100, cc=CcReading(environment=2, cc_feature=1, devtools_mode=1, gpus_caps=1, gpus_ready=1)
)

# A consumer card: the CC calls answer NVML_ERROR_NOT_SUPPORTED (all None).
RTX_4090 = GpuReading(
    driver_version="550.54.14",
    cuda_driver_version=12040,
    devices=(
        DeviceReading(
            index=0,
            name="NVIDIA GeForce RTX 4090",
            uuid="GPU-0e1f2a3b-4c5d-6e7f-8091-a2b3c4d5e6f7",
            memory_total_bytes=24564 * MIB,  # 23.99 GiB
        ),
    ),
)

OLD_DRIVER = GpuReading(
    driver_version="470.256.02",
    cuda_driver_version=11040,
    devices=(DeviceReading(0, "Tesla T4", "GPU-11111111-2222-3333", 15360 * MIB),),
)

NO_DRIVER = pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)  # what nvmlInit raises
DRIVER_NOT_LOADED = pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

GAME = GpuProcess(pid=4242, used_memory_bytes=3 * 1024 * MIB, kind="graphics")
VLLM = GpuProcess(pid=5151, used_memory_bytes=70 * 1024 * MIB, kind="compute")


def h100_with(*processes: GpuProcess) -> GpuReading:
    return with_processes(H100, *processes)
