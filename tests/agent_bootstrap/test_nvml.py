from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest

from agent_bootstrap import nvml
from agent_bootstrap.nvml import (
    CcReading,
    CcState,
    GpuReading,
    GpuUnavailable,
    NvmlReader,
    RecordedReader,
    detect,
)
from cluster.gpu import local_gpus
from tests.cluster.nvml_readings import (
    DRIVER_NOT_LOADED,
    GAME,
    H100,
    H100_CC_DEVTOOLS,
    H100_CC_ON,
    NO_DRIVER,
    OLD_DRIVER,
    RTX_4090,
    VLLM,
    h100_with,
)


def test_h100_as_recorded_is_detected_with_cc_capable_but_off() -> None:
    found = detect(RecordedReader(H100))
    assert found.name == "NVIDIA H100 80GB HBM3"
    assert found.vram_gib == 79.6
    assert found.vram_gb_resource == 80
    assert found.driver_version == "580.159.04"
    assert found.cuda_version == "13.0"
    assert found.reading.cc.capable
    assert found.cc_state is CcState.off
    assert found.processes == []
    assert found.facts() == {
        "gpu": {
            "name": "NVIDIA H100 80GB HBM3",
            "vram_gb": 79.6,
            "count": 1,
            "driver_version": "580.159.04",
            "cuda_version": "13.0",
        },
        "cc_state": "off",
    }


def test_consumer_rtx_4090_has_no_cc_and_24_gib() -> None:
    found = detect(RecordedReader(RTX_4090))
    assert found.name == "NVIDIA GeForce RTX 4090"
    assert found.vram_gb_resource == 24
    assert found.cuda_version == "12.4"
    assert found.cc_state is CcState.unsupported


@pytest.mark.parametrize(
    ("reading", "state"),
    [(H100_CC_ON, CcState.on), (H100_CC_DEVTOOLS, CcState.devtools), (H100, CcState.off)],
)
def test_cc_states(reading: GpuReading, state: CcState) -> None:
    assert detect(RecordedReader(reading)).cc_state is state


@pytest.mark.parametrize(
    ("error", "reason", "words"),
    [
        (NO_DRIVER, "no_driver", "No NVIDIA driver found"),
        (DRIVER_NOT_LOADED, "no_driver", "No NVIDIA driver is loaded"),
    ],
)
def test_no_driver_is_refused_clearly(error: Exception, reason: str, words: str) -> None:
    with pytest.raises(GpuUnavailable) as info:
        detect(RecordedReader(error))
    assert info.value.reason == reason
    assert words in str(info.value) and "535" in str(info.value)


def test_old_driver_is_refused_with_the_version() -> None:
    with pytest.raises(GpuUnavailable) as info:
        detect(RecordedReader(OLD_DRIVER))
    assert info.value.reason == "old_driver"
    assert "470.256.02 is too old" in str(info.value) and "535 or newer" in str(info.value)


def test_old_cuda_is_refused() -> None:
    reading = GpuReading("535.54.03", 11080, RTX_4090.devices)
    with pytest.raises(GpuUnavailable) as info:
        detect(RecordedReader(reading))
    assert info.value.reason == "old_cuda" and "CUDA 11.8" in str(info.value)


def test_driver_without_gpus_is_refused() -> None:
    with pytest.raises(GpuUnavailable) as info:
        detect(RecordedReader(GpuReading("580.159.04", 13000, ())))
    assert info.value.reason == "no_gpu"


def test_a_foreign_process_appearing_shows_in_the_next_reading() -> None:
    reader = RecordedReader([H100, h100_with(GAME), h100_with(GAME, VLLM)])
    assert reader.processes() == []
    assert [p.pid for p in reader.processes()] == [GAME.pid]
    assert {p.pid for p in reader.processes()} == {GAME.pid, VLLM.pid}
    assert {p.pid for p in reader.processes()} == {GAME.pid, VLLM.pid}  # the last repeats


def test_readings_survive_a_json_round_trip() -> None:
    reading = h100_with(GAME)
    assert GpuReading.from_json(reading.to_json()) == reading


def test_real_nvml_on_this_machine() -> None:
    """Here there is no driver: the real nvidia-ml-py path must refuse in plain words. On a
    machine with a GPU the same test checks that detection finds it."""
    has_driver = Path("/proc/driver/nvidia").exists()
    if has_driver:
        found = detect()
        assert found.gpu_count >= 1 and found.name
        assert local_gpus()
    else:
        with pytest.raises(GpuUnavailable) as info:
            detect()
        assert info.value.reason == "no_driver"
        assert str(info.value).startswith("No NVIDIA driver")
        assert local_gpus() == []


class FakeNvml:
    """pynvml's functions for a two-GPU machine, as nvidia-ml-py shapes its answers."""

    def __init__(self) -> None:
        self.inits = 0
        self.shutdowns = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def not_supported(*_: object) -> None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

        def init() -> None:
            self.inits += 1

        def shutdown() -> None:
            self.shutdowns += 1

        memory = SimpleNamespace(total=24564 * 1024**2)
        proc = SimpleNamespace(pid=77, usedGpuMemory=1024)
        for name, fn in {
            "nvmlInit": init,
            "nvmlShutdown": shutdown,
            "nvmlDeviceGetCount": lambda: 2,
            "nvmlDeviceGetHandleByIndex": lambda i: i,
            "nvmlDeviceGetName": lambda h: b"NVIDIA GeForce RTX 4090",
            "nvmlDeviceGetUUID": lambda h: f"GPU-{h}",
            "nvmlDeviceGetMemoryInfo": lambda h: memory,
            "nvmlSystemGetDriverVersion": lambda: "550.54.14",
            "nvmlSystemGetCudaDriverVersion_v2": lambda: 12040,
            "nvmlDeviceGetComputeRunningProcesses": lambda h: [proc] if h == 0 else [],
            "nvmlDeviceGetGraphicsRunningProcesses": lambda h: [proc] if h == 0 else [],
            "nvmlSystemGetConfComputeState": not_supported,
            "nvmlSystemGetConfComputeCapabilities": not_supported,
            "nvmlSystemGetConfComputeGpusReadyState": not_supported,
        }.items():
            monkeypatch.setattr(pynvml, name, fn)


def test_nvml_reader_shapes_what_nvidia_ml_py_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    fake.install(monkeypatch)
    reading = NvmlReader().read()
    assert [d.name for d in reading.devices] == ["NVIDIA GeForce RTX 4090"] * 2
    assert reading.cc == CcReading()  # NOT_SUPPORTED everywhere: no CC
    assert [p.pid for p in reading.devices[0].processes] == [77]  # listed once, not twice
    assert reading.devices[1].processes == ()
    assert fake.inits == fake.shutdowns == 1
    found = nvml.check(reading)
    assert found.gpu_count == 2 and found.vram_gb_resource == 48
    assert found.summary().startswith("2 × NVIDIA GeForce RTX 4090, 48 GiB")
    assert [p.pid for p in NvmlReader().processes()] == [77]
