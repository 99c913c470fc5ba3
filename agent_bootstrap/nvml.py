"""NVML behind one small interface: what a provider's machine has, and whether it qualifies.

A `GpuReader` returns one `GpuReading`: NVML's raw answers (names, memory in bytes, the
driver string, CUDA as NVML's integer `13000` = 13.0, the confidential-computing structs as
integers, each GPU's running processes). `NvmlReader` asks nvidia-ml-py; `RecordedReader`
replays readings recorded on real machines (tests, and machines without a GPU). Both raise
`pynvml.NVMLError` the same way, so `detect()` interprets and checks them with one code path:
the driver must be 535 or newer and support CUDA 12 or newer, and when NVML, its driver or a
GPU is missing the caller gets a `GpuUnavailable` that says so in plain words.

VRAM: NVML reports a little less than the marketing size (an "80GB" H100 has 79.6 GiB, an
RTX 4090 23.99 GiB), and the catalog's minimums are marketing GB, so the `vram_gb` resource
is the VRAM rounded to the nearest GiB.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from kernel.gpu import GIB, CcState

MIN_DRIVER_MAJOR = 535
MIN_CUDA = 12000  # NVML's form of CUDA 12.0

# nvmlConfComputeSystemState_t / nvmlConfComputeSystemCaps_t values (nvml.h).
_CC_FEATURE_ENABLED = 1
_CC_DEVTOOLS_ON = 1
_CC_GPUS_CAPABLE = 1
_CC_ENVIRONMENTS = {0: "unavailable", 1: "sim", 2: "prod"}


class GpuUnavailable(RuntimeError):
    """The machine cannot serve: no NVML or driver, no GPU, or a driver too old.

    `reason` is one of `no_nvml`, `no_driver`, `no_gpu`, `old_driver`, `old_cuda`, `nvml_error`.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


ProcessKind = Literal["compute", "graphics"]


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int | None = None  # None where NVML cannot tell (MIG, WDDM)
    kind: ProcessKind = "compute"


@dataclass(frozen=True)
class DeviceReading:
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    processes: tuple[GpuProcess, ...] = ()

    @property
    def vram_gib(self) -> float:
        return self.memory_total_bytes / GIB


@dataclass(frozen=True)
class CcReading:
    """The three NVML system calls, as their raw integers; None where the call is missing
    (drivers before 535, consumer GPUs: NVML_ERROR_NOT_SUPPORTED)."""

    environment: int | None = None  # nvmlSystemGetConfComputeState().environment
    cc_feature: int | None = None  # .ccFeature
    devtools_mode: int | None = None  # .devToolsMode
    gpus_caps: int | None = None  # nvmlSystemGetConfComputeCapabilities().gpusCaps
    gpus_ready: int | None = None  # nvmlSystemGetConfComputeGpusReadyState()

    @property
    def capable(self) -> bool:
        return self.gpus_caps == _CC_GPUS_CAPABLE

    @property
    def state(self) -> CcState:
        if not self.capable:
            return CcState.unsupported
        if self.cc_feature != _CC_FEATURE_ENABLED:
            return CcState.off
        if self.devtools_mode == _CC_DEVTOOLS_ON:
            return CcState.devtools
        return CcState.on

    @property
    def environment_name(self) -> str | None:
        return None if self.environment is None else _CC_ENVIRONMENTS.get(self.environment, "?")


@dataclass(frozen=True)
class GpuReading:
    driver_version: str
    cuda_driver_version: int
    devices: tuple[DeviceReading, ...]
    cc: CcReading = field(default_factory=CcReading)

    def to_json(self) -> dict[str, Any]:
        return {
            "driver_version": self.driver_version,
            "cuda_driver_version": self.cuda_driver_version,
            "cc": vars(self.cc),
            "devices": [
                {
                    "index": d.index,
                    "name": d.name,
                    "uuid": d.uuid,
                    "memory_total_bytes": d.memory_total_bytes,
                    "processes": [vars(p) for p in d.processes],
                }
                for d in self.devices
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GpuReading:
        return cls(
            driver_version=data["driver_version"],
            cuda_driver_version=int(data["cuda_driver_version"]),
            cc=CcReading(**data.get("cc", {})),
            devices=tuple(
                DeviceReading(
                    index=d["index"],
                    name=d["name"],
                    uuid=d["uuid"],
                    memory_total_bytes=int(d["memory_total_bytes"]),
                    processes=tuple(GpuProcess(**p) for p in d.get("processes", ())),
                )
                for d in data["devices"]
            ),
        )


class GpuReader(Protocol):
    def read(self) -> GpuReading:
        """Everything NVML says about this machine; raises `pynvml.NVMLError` as NVML does."""
        ...

    def processes(self) -> list[GpuProcess]:
        """The processes running on any GPU now (the idle check, every few seconds)."""
        ...

    def attestation_report(self, index: int, nonce: bytes) -> tuple[bytes, bytes]:
        """GPU `index`'s CC attestation report over `nonce` (32 bytes) and its certificate
        chain; raises `pynvml.NVMLError` where CC is off or unsupported."""
        ...


@dataclass(frozen=True)
class Detection:
    """A machine that qualifies: its GPUs, driver, CUDA and confidential-computing state."""

    reading: GpuReading

    @property
    def devices(self) -> tuple[DeviceReading, ...]:
        return self.reading.devices

    @property
    def name(self) -> str:
        return self.devices[0].name

    @property
    def gpu_count(self) -> int:
        return len(self.devices)

    @property
    def vram_gib(self) -> float:
        """All GPUs' VRAM together, in GiB (one decimal)."""
        return round(sum(d.vram_gib for d in self.devices), 1)

    @property
    def vram_gb_resource(self) -> int:
        """The node's `vram_gb` resource: each GPU's VRAM to the nearest GiB, summed."""
        return sum(round(d.vram_gib) for d in self.devices)

    @property
    def driver_version(self) -> str:
        return self.reading.driver_version

    @property
    def cuda_version(self) -> str:
        return cuda_version_text(self.reading.cuda_driver_version)

    @property
    def cc_state(self) -> CcState:
        return self.reading.cc.state

    @property
    def processes(self) -> list[GpuProcess]:
        return [p for d in self.devices for p in d.processes]

    def facts(self) -> dict[str, Any]:
        """What the platform's register endpoint takes (`gpu` and `cc_state`)."""
        return {
            "gpu": {
                "name": self.name,
                "vram_gb": self.vram_gib,
                "count": self.gpu_count,
                "driver_version": self.driver_version,
                "cuda_version": self.cuda_version,
            },
            "cc_state": self.cc_state.value,
        }

    def summary(self) -> str:
        many = f"{self.gpu_count} × " if self.gpu_count > 1 else ""
        return (
            f"{many}{self.name}, {self.vram_gib:g} GiB VRAM, driver {self.driver_version}, "
            f"CUDA {self.cuda_version}, confidential computing {self.cc_state.value}"
        )


def cuda_version_text(version: int) -> str:
    """NVML's CUDA integer as text: 13000 → "13.0", 12040 → "12.4"."""
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_major(version: str) -> int | None:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _nvml_unavailable(exc: Exception) -> GpuUnavailable:
    import pynvml

    if isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        return GpuUnavailable(
            "no_driver",
            "No NVIDIA driver found: NVML (libnvidia-ml.so.1) is not installed. Install the "
            f"NVIDIA driver {MIN_DRIVER_MAJOR} or newer and check that `nvidia-smi` works.",
        )
    if isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        return GpuUnavailable(
            "no_driver",
            "No NVIDIA driver is loaded (NVML: Driver Not Loaded). Load the NVIDIA kernel "
            f"module or reboot after installing the driver ({MIN_DRIVER_MAJOR} or newer), and "
            "check that `nvidia-smi` works.",
        )
    if isinstance(exc, pynvml.NVMLError_NoPermission):
        return GpuUnavailable(
            "nvml_error", "NVML refused access to the GPU (No Permission): run as a user who "
            "may use the GPU (for example, a member of the `video` group).",
        )  # fmt: skip
    return GpuUnavailable("nvml_error", f"NVML failed: {exc}")


def check(reading: GpuReading) -> Detection:
    """The reading as a `Detection`, or `GpuUnavailable` when the machine cannot serve."""
    if not reading.devices:
        raise GpuUnavailable("no_gpu", "The NVIDIA driver is loaded but sees no GPU.")
    major = driver_major(reading.driver_version)
    if major is None or major < MIN_DRIVER_MAJOR:
        raise GpuUnavailable(
            "old_driver",
            f"NVIDIA driver {reading.driver_version} is too old: DarkGPU needs driver "
            f"{MIN_DRIVER_MAJOR} or newer. Update the driver and run this again.",
        )
    if reading.cuda_driver_version < MIN_CUDA:
        raise GpuUnavailable(
            "old_cuda",
            f"The NVIDIA driver supports CUDA {cuda_version_text(reading.cuda_driver_version)}"
            f": DarkGPU needs CUDA {MIN_CUDA // 1000} or newer. Update the driver.",
        )
    return Detection(reading)


def detect(reader: GpuReader | None = None) -> Detection:
    """Read this machine's GPUs through `reader` (NVML by default) and check them."""
    try:
        import pynvml
    except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
        raise GpuUnavailable(
            "no_nvml", "nvidia-ml-py is not installed: pip install nvidia-ml-py"
        ) from None
    try:
        reading = (reader or NvmlReader()).read()
    except pynvml.NVMLError as exc:
        raise _nvml_unavailable(exc) from None
    return check(reading)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlReader:
    """The real thing: nvidia-ml-py. Each call initialises and shuts NVML down again."""

    def read(self) -> GpuReading:
        import pynvml

        pynvml.nvmlInit()
        try:
            devices = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                devices.append(
                    DeviceReading(
                        index=index,
                        name=_text(pynvml.nvmlDeviceGetName(handle)),
                        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                        memory_total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                        processes=tuple(self._device_processes(handle)),
                    )
                )
            return GpuReading(
                driver_version=_text(pynvml.nvmlSystemGetDriverVersion()),
                cuda_driver_version=int(pynvml.nvmlSystemGetCudaDriverVersion_v2()),
                devices=tuple(devices),
                cc=self._cc(),
            )
        finally:
            pynvml.nvmlShutdown()

    def processes(self) -> list[GpuProcess]:
        import pynvml

        pynvml.nvmlInit()
        try:
            out: list[GpuProcess] = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                out.extend(self._device_processes(pynvml.nvmlDeviceGetHandleByIndex(index)))
            return out
        finally:
            pynvml.nvmlShutdown()

    def attestation_report(self, index: int, nonce: bytes) -> tuple[bytes, bytes]:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            report = pynvml.nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)
            cert = pynvml.nvmlDeviceGetConfComputeGpuCertificate(handle)
            body = bytes(report.attestationReport[: report.attestationReportSize])
            chain = bytes(cert.attestationCertChain[: cert.attestationCertChainSize])
            return body, chain
        finally:
            pynvml.nvmlShutdown()

    @staticmethod
    def _device_processes(handle: Any) -> Iterable[GpuProcess]:
        import pynvml

        seen: set[int] = set()
        calls: tuple[tuple[ProcessKind, Callable[[Any], Any]], ...] = (
            ("compute", pynvml.nvmlDeviceGetComputeRunningProcesses),
            ("graphics", pynvml.nvmlDeviceGetGraphicsRunningProcesses),
        )
        for kind, call in calls:
            try:
                found = call(handle)
            except pynvml.NVMLError_NotSupported:
                continue
            for proc in found:
                if proc.pid in seen:
                    continue
                seen.add(proc.pid)
                used = getattr(proc, "usedGpuMemory", None)
                yield GpuProcess(pid=int(proc.pid), used_memory_bytes=used, kind=kind)

    @staticmethod
    def _cc() -> CcReading:
        import pynvml

        def attempt(call: Any) -> Any:
            try:
                return call()
            except (pynvml.NVMLError, AttributeError):  # old drivers, consumer GPUs
                return None

        state = attempt(pynvml.nvmlSystemGetConfComputeState)
        caps = attempt(pynvml.nvmlSystemGetConfComputeCapabilities)
        ready = attempt(pynvml.nvmlSystemGetConfComputeGpusReadyState)
        return CcReading(
            environment=None if state is None else int(state.environment),
            cc_feature=None if state is None else int(state.ccFeature),
            devtools_mode=None if state is None else int(state.devToolsMode),
            gpus_caps=None if caps is None else int(caps.gpusCaps),
            gpus_ready=None if ready is None else int(ready),
        )


class RecordedReader:
    """Replays recorded readings: each `read()`/`processes()` moves to the next one and the
    last repeats. An entry that is an exception is raised, as NVML would raise it (use the
    `pynvml.NVMLError` subclasses, e.g. `NVMLError_LibraryNotFound()` for a machine with no
    driver). `report_signer(index, nonce) -> (report, chain)` stands in for the GPU's
    attestation engine where the recorded GPU has CC on (tests of CC evidence)."""

    def __init__(
        self,
        readings: Sequence[GpuReading | BaseException] | GpuReading | BaseException,
        report_signer: Callable[[int, bytes], tuple[bytes, bytes]] | None = None,
    ) -> None:
        self._readings = list(readings) if isinstance(readings, Sequence) else [readings]
        if not self._readings:
            raise ValueError("RecordedReader needs at least one reading")
        self._at = 0
        self._last: GpuReading | None = None
        self._signer = report_signer

    def _next(self) -> GpuReading:
        item = self._readings[min(self._at, len(self._readings) - 1)]
        self._at += 1
        if isinstance(item, BaseException):
            raise item
        self._last = item
        return item

    def read(self) -> GpuReading:
        return self._next()

    def processes(self) -> list[GpuProcess]:
        return [p for d in self._next().devices for p in d.processes]

    def attestation_report(self, index: int, nonce: bytes) -> tuple[bytes, bytes]:
        import pynvml

        current = self._last or self._next()
        if current.cc.state is not CcState.on or self._signer is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self._signer(index, nonce)


def with_processes(reading: GpuReading, *processes: GpuProcess, index: int = 0) -> GpuReading:
    """`reading` with `processes` running on GPU `index` (for recorded sequences)."""
    devices = list(reading.devices)
    devices[index] = replace(devices[index], processes=tuple(processes))
    return replace(reading, devices=tuple(devices))
