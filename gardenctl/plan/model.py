"""The Plan: ordered actions, each with a cause, and every GPU's ledger before -> after.

A plan is a value: `plan` shows it, `plan --out` saves it, `apply` executes exactly it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from gardenctl.observe import ObservedWorker
from gardenctl.placement.model import LedgerRow, Unplaced
from gardenctl.workers import DesiredWorker

PLAN_FORMAT_VERSION = 1

START = "start"
STOP = "stop"
REPLACE = "replace"
KEEP = "keep"
ACTION_ORDER = {STOP: 0, REPLACE: 1, START: 2, KEEP: 3}


@dataclass(frozen=True)
class Action:
    action: str  # start | stop | replace | keep
    worker_id: str
    model: str
    cause: str  # in plain words
    worker: DesiredWorker | None = None  # what will run (start, replace, keep)
    previous: ObservedWorker | None = None  # what runs now (stop, replace, keep)

    @property
    def node(self) -> str:
        return self.worker.node if self.worker else self.previous.node  # type: ignore[union-attr]

    @property
    def gpus(self) -> tuple[int, ...]:
        return self.worker.gpus if self.worker else self.previous.gpus  # type: ignore[union-attr]

    @property
    def claim_bytes(self) -> int:
        source = self.worker or self.previous
        return source.claim_bytes  # type: ignore[union-attr]

    @property
    def utilization(self) -> float:
        source = self.worker or self.previous
        return source.utilization  # type: ignore[union-attr]

    @property
    def port(self) -> int:
        source = self.worker or self.previous
        return source.port  # type: ignore[union-attr]

    @property
    def changes(self) -> bool:
        """True when applying it changes a worker or gardenctl's records of one: every action
        but keep, and a keep that adopts a worker found running without a record."""
        return self.action != KEEP or self.adopts

    @property
    def adopts(self) -> bool:
        return (self.action == KEEP and self.previous is not None
                and not self.previous.has_record and self.previous.running)

    @property
    def loading(self) -> bool:
        """A kept worker that is still starting (an earlier apply was interrupted)."""
        return (self.action == KEEP and self.previous is not None
                and self.previous.phase == "starting")


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
    actions: tuple[Action, ...]
    ledgers: tuple[LedgerRow, ...]
    unplaced: tuple[Unplaced, ...]
    warnings: tuple[str, ...] = field(default=())
    models: tuple[ModelSummary, ...] = field(default=())

    @property
    def has_changes(self) -> bool:
        return any(a.changes for a in self.actions)

    @property
    def has_work(self) -> bool:
        """Something for apply to do: changes, or workers still loading to wait for."""
        return any(a.changes or a.loading for a in self.actions)

    def count(self, action: str) -> int:
        return sum(1 for a in self.actions if a.action == action)

    def summary(self) -> dict[str, int]:
        return {
            "start": self.count(START),
            "replace": self.count(REPLACE),
            "stop": self.count(STOP),
            "keep": self.count(KEEP),
            "unplaced": len(self.unplaced),
        }
