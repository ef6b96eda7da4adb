"""An honest fake of the `pynvml` module (nvidia-ml-py), for the part of it gardenctl uses.

    nvml = FakeNvml([FakeGpu("NVIDIA L4", total=24 * GiB, used=2 * GiB,
                             compute=[FakeProcess(pid=4242, usedGpuMemory=2 * GiB)])])
    discover_local_gpus(nvml=nvml)          # or: monkeypatch.setitem(sys.modules, "pynvml", nvml)

It behaves like the real bindings where gardenctl could notice the difference:
- every call but `nvmlInit` needs an initialised library, else NVMLError_Uninitialized;
  `nvmlInit`/`nvmlShutdown` nest like NVML's reference count (`init_count` shows it, so a test
  can check that every init was matched by a shutdown);
- `nvmlInit` fails with the code given as `init_error` (e.g. NVML_ERROR_DRIVER_NOT_LOADED, what
  a machine with the library but no driver says);
- a bad index or handle is NVML_ERROR_INVALID_ARGUMENT;
- `NVMLError(code)` builds that code's subclass (`NVMLError(9)` is an NVMLError_DriverNotLoaded),
  subclasses are built without arguments, `.value` is the code and `str()` is NVML's text;
- names and UUIDs are returned as given (str like nvidia-ml-py >= 11.515, or bytes like older
  versions); process objects have `.pid` and `.usedGpuMemory`, None when the driver cannot tell.

tests/test_cli_inventory.py checks this surface against the real `pynvml`: every `nvml*`
function, `NVML_*` constant and `NVMLError*` class here exists there with the same signature,
value or code. Attributes that do not start with nvml/NVML are the fake's own controls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

# NVML's own texts (pynvml's NVMLError._errcode_to_string).
_ERROR_TEXT = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Like pynvml.NVMLError: NVMLError(code) is an instance of that code's subclass."""

    _valClassMapping: ClassVar[dict[int, type]] = {}  # pynvml's name: code -> subclass

    def __new__(cls, value: int):
        chosen = NVMLError._valClassMapping.get(value, cls) if cls is NVMLError else cls
        error = Exception.__new__(chosen)
        error.value = value
        return error

    def __str__(self) -> str:
        return _ERROR_TEXT.get(self.value, f"NVML Error with code {self.value}")


def _error_class(class_name: str, code: int) -> type:
    def new(cls):
        return NVMLError.__new__(cls, code)

    cls = type(class_name, (NVMLError,), {"__new__": new})
    NVMLError._valClassMapping[code] = cls
    return cls


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _error_class("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_Unknown = _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN)


@dataclass(frozen=True)
class FakeProcess:
    """A process on a GPU, like pynvml's c_nvmlProcessInfo_t (usedGpuMemory None: unknown)."""

    pid: int
    # pynvml's field names
    usedGpuMemory: int | None
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass(frozen=True)
class FakeMemory:
    """Like pynvml's c_nvmlMemory_t."""

    total: int
    free: int
    used: int


@dataclass
class FakeGpu:
    """One GPU. `*_error`: the NVML error code that call raises on this GPU (None: works)."""

    name: str | bytes
    total: int
    used: int = 0
    uuid: str | bytes = ""
    compute: list[FakeProcess] = field(default_factory=list)
    graphics: list[FakeProcess] = field(default_factory=list)
    memory_error: int | None = None
    processes_error: int | None = None


@dataclass(frozen=True)
class _Handle:
    """An opaque device handle, like pynvml's c_nvmlDevice_t."""

    index: int


class FakeNvml:
    """Stands in for the `pynvml` module: pass it as `nvml=`, or put it in sys.modules."""

    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_Unknown = NVMLError_Unknown
    NVML_SUCCESS = NVML_SUCCESS
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN

    def __init__(self, gpus: list[FakeGpu] | None = None, init_error: int | None = None) -> None:
        self.gpus = list(gpus or [])
        self.init_error = init_error
        self.init_count = 0

    # -- the pynvml functions gardenctl calls (same names and parameters as nvidia-ml-py) --

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self._check_initialised()
        self.init_count -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._check_initialised()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._check_initialised()
        if not isinstance(index, int) or not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(index)

    def nvmlDeviceGetName(self, handle):
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle):
        return self._gpu(handle).uuid

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        gpu = self._gpu(handle)
        if gpu.memory_error is not None:
            raise NVMLError(gpu.memory_error)
        return FakeMemory(total=gpu.total, free=gpu.total - gpu.used, used=gpu.used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        gpu = self._gpu(handle)
        if gpu.processes_error is not None:
            raise NVMLError(gpu.processes_error)
        return list(gpu.compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        gpu = self._gpu(handle)
        if gpu.processes_error is not None:
            raise NVMLError(gpu.processes_error)
        return list(gpu.graphics)

    # -- helpers --

    def _check_initialised(self) -> None:
        if self.init_count <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle) -> FakeGpu:
        self._check_initialised()
        if not isinstance(handle, _Handle) or handle.index >= len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[handle.index]


def fake_surface(nvml: FakeNvml) -> dict[str, object]:
    """Every name the fake offers as part of pynvml's surface (nvml*, NVML*)."""
    return {name: getattr(nvml, name) for name in dir(nvml)
            if name.startswith(("nvml", "NVML"))}
