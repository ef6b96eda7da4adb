"""The hardware a garden runs on: nodes, their GPUs, and what other processes use."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU, as NVML reports it."""

    pid: int
    used_bytes: int | None  # None when the driver does not say (e.g. inside some containers)
    name: str = ""


@dataclass(frozen=True)
class Gpu:
    node: str
    index: int  # NVML / PCI bus order, the order CUDA_DEVICE_ORDER=PCI_BUS_ID gives
    name: str
    total_bytes: int
    used_bytes: int = 0  # all users, ours included (NVML), or what others use (declared)
    uuid: str | None = None
    processes: tuple[GpuProcess, ...] = ()

    @property
    def key(self) -> tuple[str, int]:
        return (self.node, self.index)

    @property
    def label(self) -> str:
        return f"{self.node} GPU {self.index}"


@dataclass(frozen=True)
class Node:
    name: str
    gpus: tuple[Gpu, ...]
    host_memory_bytes: int | None = None  # host RAM (None: unknown, not checked)


@dataclass(frozen=True)
class Inventory:
    nodes: tuple[Node, ...]
    source: str  # "nvml", "declared in garden.yaml", "file inventory.yaml"
    notes: tuple[str, ...] = field(default=())
    # True when each GPU's used_bytes includes our own workers (NVML); False when it is what
    # other processes use (a declared inventory).
    used_includes_ours: bool = False

    @property
    def gpus(self) -> tuple[Gpu, ...]:
        return tuple(gpu for node in self.nodes for gpu in node.gpus)

    def node(self, name: str) -> Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def gpu(self, node: str, index: int) -> Gpu | None:
        found = self.node(node)
        if found is None:
            return None
        return next((g for g in found.gpus if g.index == index), None)

    def fingerprint(self) -> str:
        """Changes when the hardware changes (nodes, GPUs, their names and sizes)."""
        shape = [[g.node, g.index, g.name, g.total_bytes] for g in self.gpus]
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]
