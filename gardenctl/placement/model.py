"""Values the planner takes and returns: requests, running holdings, assignments, reasons."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gardenctl.estimate.types import MemoryEstimate


@dataclass(frozen=True)
class WorkerRequest:
    """One worker the garden wants, before it has a place."""

    worker_id: str  # garden/model/replica
    model: str  # the model's name in the garden
    replica: int
    tensor_parallel_size: int
    priority: int
    estimate: MemoryEstimate
    utilization: float | None = None  # a fixed --gpu-memory-utilization from the file
    pin_node: str | None = None
    pin_gpus: tuple[int, ...] | None = None
    sizing_hash: str = ""  # what sizes the worker: changes force a new placement
    spread: bool = False  # never on a GPU that holds a replica of the same model


@dataclass(frozen=True)
class Holding:
    """A worker of ours that runs now and holds memory on its GPUs."""

    worker_id: str
    model: str
    node: str
    gpus: tuple[int, ...]
    utilization: float
    claim_bytes: int  # per GPU
    sizing_hash: str = ""


@dataclass(frozen=True)
class Assignment:
    worker_id: str
    model: str
    node: str
    gpus: tuple[int, ...]
    utilization: float
    claim_bytes: int  # per GPU: ceil(utilization x total) + CUDA context
    kept: bool  # True: stays where it runs now


@dataclass(frozen=True)
class Reason:
    """Why a worker could not go somewhere: structured, so tools can read it."""

    code: str
    message: str
    node: str | None = None
    gpu: int | None = None
    requested_bytes: int | None = None
    free_bytes: int | None = None
    total_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "node": self.node,
            "gpu": self.gpu,
            "requested_bytes": self.requested_bytes,
            "free_bytes": self.free_bytes,
            "total_bytes": self.total_bytes,
        }


# Reason codes
BELOW_MIN_AVAILABLE = "below_min_available"
INSUFFICIENT_MEMORY = "insufficient_memory"
EXCEEDS_GPU = "exceeds_gpu"
NOT_ENOUGH_GPUS = "not_enough_gpus"
PINNED_NODE_MISSING = "pinned_node_missing"
PINNED_GPU_MISSING = "pinned_gpu_missing"
REPLICAS_APART = "replicas_apart"
NO_GPUS = "no_gpus"
MORE_GPUS = "more_gpus_tried"


@dataclass(frozen=True)
class Unplaced:
    worker_id: str
    model: str
    reasons: tuple[Reason, ...]
    kept_previous: bool = False  # its running, older version keeps its place


@dataclass(frozen=True)
class LedgerRow:
    """One GPU's memory account before and after the plan."""

    node: str
    index: int
    name: str
    total_bytes: int
    used_by_others_bytes: int
    reserve_bytes: int
    claimed_before_bytes: int
    claimed_after_bytes: int
    workers_before: tuple[tuple[str, int], ...]  # (worker_id, claim bytes)
    workers_after: tuple[tuple[str, int], ...]

    @property
    def free_after_bytes(self) -> int:
        return self.total_bytes - self.used_by_others_bytes - self.claimed_after_bytes

    @property
    def overcommitted(self) -> bool:
        return self.free_after_bytes < 0


@dataclass(frozen=True)
class Placement:
    assignments: tuple[Assignment, ...]  # sorted by worker_id
    unplaced: tuple[Unplaced, ...]  # sorted by worker_id
    ledgers: tuple[LedgerRow, ...]  # sorted by (node, index)

    def assignment(self, worker_id: str) -> Assignment | None:
        return next((a for a in self.assignments if a.worker_id == worker_id), None)
