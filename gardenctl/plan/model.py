"""The Plan: every step `apply` will take, each with its cause and what it waits for, and every
GPU's ledger before -> after.

A plan is a value: `plan` shows it, `plan --out` saves it, `apply` executes exactly it (a saved
plan is refused unless the garden, GPUs and workers still produce exactly the same steps). The
executor decides nothing: which steps run, in which order, what happens when one fails (skip
what depended on it, roll a failed replacement back) is written in the steps' dependencies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from gardenctl.observe import ObservedWorker, Rejection
from gardenctl.placement.model import LedgerRow, Unplaced
from gardenctl.vocab import Blocker, Phase, StepKind
from gardenctl.workers import DesiredWorker

PLAN_FORMAT_VERSION = 2

GpuKey = tuple[str, int]


class When(str, Enum):
    """What a step needs of a step it depends on."""

    DONE = "done"  # succeeded: a start is ready, a stop released its memory
    FAILED = "failed"  # failed (a rollback runs only if its replacement failed)
    FINISHED = "finished"  # either (the GPU is no longer busy with it)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Needs:
    step_id: str
    when: When = When.DONE

    def to_json(self) -> dict[str, str]:
        return {"step": self.step_id, "when": self.when.value}


@dataclass(frozen=True)
class Launch:
    """How a spawn records the run it begins: its history and what it replaces."""

    restarts: int = 0  # started again after failures (shown like k8s RESTARTS)
    streak: int = 0  # failed runs in a row before this one (backoff)
    replaces: DesiredWorker | None = None  # the running version, to roll back to if needed
    rejected: Rejection | None = None  # set by a rollback: the version that failed


@dataclass(frozen=True)
class Step:
    kind: StepKind
    worker_id: str
    model: str
    cause: str  # why, in plain words (one line)
    worker: DesiredWorker | None = None  # what runs after it (spawns, keep, await, adopt...)
    previous: ObservedWorker | None = None  # what runs (or ran) before it
    after: tuple[Needs, ...] = ()
    launch: Launch | None = None  # spawns only
    then: Phase | None = None  # stops: keep the record in this phase (None: remove it)
    ends_because: str = ""  # a run it ends (to start it again): why, as its record will say
    until: float | None = None  # hold: not before this wall-clock time
    blocked_by: Blocker | None = None  # a wait: on what
    notes: tuple[str, ...] = ()  # what else a reader should know (availability, rollback)

    @property
    def id(self) -> str:
        return f"{self.kind.value}:{self.worker_id}"

    @property
    def target(self) -> DesiredWorker | ObservedWorker:
        if self.worker is not None:
            return self.worker
        assert self.previous is not None, f"step {self.id} names no worker"
        return self.previous

    @property
    def spec(self) -> DesiredWorker:
        """The worker's spec: the version it starts or keeps, else the one it stops."""
        target = self.target
        return target if isinstance(target, DesiredWorker) else target.spec

    @property
    def node(self) -> str:
        return self.target.node

    @property
    def gpus(self) -> tuple[int, ...]:
        return self.target.gpus

    @property
    def claim_bytes(self) -> int:
        return self.target.claim_bytes

    @property
    def utilization(self) -> float:
        return self.target.utilization

    @property
    def port(self) -> int:
        return self.target.port

    @property
    def gpu_keys(self) -> frozenset[GpuKey]:
        """Every GPU it touches: where it runs after, and where the version it stops ran."""
        target = self.target
        node = target.node
        keys = {(node, index) for index in target.gpus}
        previous = self.previous
        if previous is not None and self.kind in (StepKind.REPLACE, StepKind.RESTART,
                                                   StepKind.ROLLBACK):
            node = previous.node
            keys.update((node, index) for index in previous.gpus)
        return frozenset(keys)

    @property
    def conditional(self) -> bool:
        """It runs only if something fails (a rollback)."""
        return any(n.when == When.FAILED for n in self.after)

    @property
    def changes(self) -> bool:
        return self.kind.acts and not self.conditional

    @property
    def loading(self) -> bool:
        return self.kind == StepKind.AWAIT


@dataclass(frozen=True)
class ModelSummary:
    """What the plan assumed about one model's memory, per GPU (see `gardenctl estimate`)."""

    name: str
    model: str
    replicas: int
    tensor_parallel_size: int
    max_model_len: int
    min_concurrency: int
    kv_bytes_per_token: int
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    cuda_graph_bytes: int
    non_torch_bytes: int
    cuda_context_bytes: int
    total_bytes: int
    weights_source: str
    memory_source: str = "estimate"  # or "measured": sized from a learned profile
    memory_note: str = ""  # where and when it was measured, or a hint from another release
    vllm_version: str = ""  # the release the model was sized for
    vllm_version_assumed: bool = False  # neither declared nor detected: the newest modelled

    @property
    def other_bytes(self) -> int:
        return (self.activation_bytes + self.cuda_graph_bytes + self.non_torch_bytes
                + self.cuda_context_bytes)


@dataclass(frozen=True)
class Plan:
    garden: str
    garden_file: str
    inventory_source: str
    fingerprints: Mapping[str, str]  # garden, inventory, observed: for refusing stale plans
    steps: tuple[Step, ...]  # in the order they may begin
    ledgers: tuple[LedgerRow, ...]
    unplaced: tuple[Unplaced, ...]
    warnings: tuple[str, ...] = field(default=())
    models: tuple[ModelSummary, ...] = field(default=())

    @property
    def has_changes(self) -> bool:
        return any(s.changes for s in self.steps)

    @property
    def has_work(self) -> bool:
        """Something for apply to do: changes, or workers still loading to wait for."""
        return any(s.changes or s.loading for s in self.steps)

    @property
    def blocked(self) -> bool:
        """Some worker cannot be started now: held by its backoff, or waiting for something
        outside gardenctl (an unset secret, a taken port, a stopped rollout)."""
        return any(s.kind in (StepKind.HOLD, StepKind.WAIT) for s in self.steps)

    @property
    def converged(self) -> bool:
        """Nothing to do and nothing waiting: every worker runs as the garden wants."""
        return not self.unplaced and all(s.kind == StepKind.KEEP for s in self.steps)

    def step(self, step_id: str) -> Step | None:
        return next((s for s in self.steps if s.id == step_id), None)

    def count(self, kind: StepKind) -> int:
        return sum(1 for s in self.steps if s.kind == kind and not s.conditional)

    def summary(self) -> dict[str, int]:
        counts = {kind.value: self.count(kind) for kind in StepKind}
        counts["unplaced"] = len(self.unplaced)
        return counts
