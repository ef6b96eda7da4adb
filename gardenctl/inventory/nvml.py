"""GPU discovery through NVML (the `pynvml` module of the nvidia-ml-py package).

The NVML module is a parameter so tests can pass a fake with the same functions; by default
`pynvml` is imported on first use, never at CLI start-up. Indexes are NVML's, which follow the
PCI bus order; workers get CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA numbers GPUs the same way.
"""

from __future__ import annotations

import socket
from types import ModuleType
from typing import Any

from gardenctl.errors import GpuReadError, InventoryError
from gardenctl.inventory.model import Gpu, GpuProcess, Inventory, Node


def load_nvml() -> ModuleType:
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise InventoryError(
            "the NVML bindings are not installed (pip install nvidia-ml-py)"
        ) from exc
    return pynvml


def discover_local_gpus(nvml: Any = None, node_name: str | None = None) -> Inventory:
    """Read every GPU of this machine: name, uuid, memory, and the processes using it."""
    nvml = nvml if nvml is not None else load_nvml()
    node = node_name or socket.gethostname()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise InventoryError(
            f"no NVIDIA GPU could be read on this machine (NVML: {exc}). Declare the hardware "
            "in the garden's `inventory:` section or pass --inventory FILE to plan without GPUs."
        ) from None
    try:
        gpus = tuple(_read_gpu(nvml, node, i) for i in range(nvml.nvmlDeviceGetCount()))
    except nvml.NVMLError as exc:
        raise InventoryError(f"reading GPUs through NVML failed: {exc}") from None
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    if not gpus:
        raise InventoryError(
            "NVML found no GPU on this machine. Declare the hardware in the garden's "
            "`inventory:` section or pass --inventory FILE."
        )
    return Inventory(nodes=(Node(name=node, gpus=gpus, host_memory_bytes=_host_memory()),),
                     source="nvml", used_includes_ours=True)


def _host_memory() -> int | None:
    """This machine's RAM (level-1 standby models keep their weights there while asleep)."""
    import psutil

    try:
        return int(psutil.virtual_memory().total)
    except OSError:
        return None


def _read_gpu(nvml: Any, node: str, index: int) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return Gpu(
        node=node,
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        total_bytes=int(memory.total),
        used_bytes=int(memory.used),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        processes=_processes(nvml, handle),
    )


def _processes(nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    found: dict[int, GpuProcess] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            processes = getattr(nvml, getter)(handle)
        except nvml.NVMLError:
            continue
        for process in processes:
            used = getattr(process, "usedGpuMemory", None)
            pid = int(process.pid)
            found.setdefault(pid, GpuProcess(pid=pid,
                                             used_bytes=None if used is None else int(used)))
    return tuple(sorted(found.values(), key=lambda p: p.pid))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlProbe:
    """Live free memory and process lists of this machine's GPUs (for the executor).

    NVML failures (a GPU lost, the driver reloaded) are GpuReadErrors (temporary): the action
    that needed the answer fails with a clear message and a later pass may succeed."""

    def __init__(self, node: str, nvml: Any = None) -> None:
        self.node = node
        self.nvml = nvml if nvml is not None else load_nvml()
        self._call("initialise NVML", self.nvml.nvmlInit)

    def _call(self, what: str, function: Any, *args: Any) -> Any:
        try:
            return function(*args)
        except self.nvml.NVMLError as exc:
            raise GpuReadError(f"NVML could not {what}: {exc}") from None

    def _handle(self, node: str, index: int) -> Any:
        if node != self.node:
            raise InventoryError(f"NVML on {self.node} cannot read GPUs of node {node}")
        return self._call(f"find GPU {index}", self.nvml.nvmlDeviceGetHandleByIndex, index)

    def free_bytes(self, node: str, index: int) -> int:
        handle = self._handle(node, index)
        memory = self._call(f"read GPU {index}'s memory", self.nvml.nvmlDeviceGetMemoryInfo, handle)
        return int(memory.free)

    def pids_on(self, node: str, index: int) -> set[int]:
        handle = self._handle(node, index)
        return {p.pid for p in self._call(f"list GPU {index}'s processes", _processes, self.nvml,
                                          handle)}

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass
