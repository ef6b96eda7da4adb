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
    # standby: sleep mode at this level (1: weights to host RAM, 2: dropped); 0: not asleep
    standby_level: int = 0
    standby_stop: bool = False  # standby: stop (the process is stopped while idle)

    @property
    def standby(self) -> bool:
        return bool(self.standby_level) or self.standby_stop

    @property
    def asleep_bytes(self) -> int | None:
        """Per GPU while asleep (None: never sleeps): what vLLM's sleep mode leaves on the GPU,
        the CUDA context, non-torch memory and the CUDA-graph pool (docs/vllm.md section 11);
        nothing for a stopped one."""
        if self.standby_stop:
            return 0
        if not self.standby_level:
            return None
        e = self.estimate
        return (e.cuda_context.bytes + e.non_torch.bytes + e.cuda_graph.bytes
                + e.graph_overflow_bytes)

    @property
    def host_bytes(self) -> int:
        """Host RAM the worker takes while asleep: its weights, all ranks, at level 1."""
        if self.standby_level != 1:
            return 0
        return self.estimate.weights.bytes * self.tensor_parallel_size


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
    asleep_bytes: int | None = None  # a standby worker's bytes per GPU while asleep


@dataclass(frozen=True)
class Assignment:
    worker_id: str
    model: str
    node: str
    gpus: tuple[int, ...]
    utilization: float
    claim_bytes: int  # per GPU: ceil(utilization x total) + CUDA context
    kept: bool  # True: stays where it runs now
    asleep_bytes: int | None = None  # standby: per GPU while asleep (claim_bytes: awake)


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
HOST_MEMORY = "host_memory"


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
    # Standby workers after the plan, (worker_id, awake claim, asleep bytes): each is counted
    # asleep in claimed_after_bytes, plus one wake slot, the largest (awake - asleep) of them.
    # Any set of them whose (awake - asleep) sum stays within the slot may be awake at once.
    standby_after: tuple[tuple[str, int, int], ...] = ()

    @property
    def wake_slot_bytes(self) -> int:
        return max((awake - asleep for _, awake, asleep in self.standby_after), default=0)

    @property
    def asleep_after_bytes(self) -> int:
        return sum(asleep for _, _, asleep in self.standby_after)

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
