"""What runs now: a snapshot of our workers, taken once per plan by a runtime's `observe()`.

The reconciler and the planner only ever see this snapshot (never live processes), so a plan is
a pure function of (garden, inventory, observed).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from gardenctl.placement.model import Holding

# Phases of a worker
STARTING = "starting"  # process alive, not answering /health + /v1/models yet
READY = "ready"
CRASHED = "crashed"  # process gone without being asked to stop
STOPPED = "stopped"  # record kept, process stopped on purpose
UNKNOWN = "unknown"  # alive, but its health could not be checked
RUNNING_PHASES = (STARTING, READY, UNKNOWN)


@dataclass(frozen=True)
class ObservedWorker:
    worker_id: str
    garden: str
    model: str
    replica: int
    node: str
    gpus: tuple[int, ...]
    port: int
    utilization: float
    claim_bytes: int
    spec_hash: str
    sizing_hash: str
    argv: tuple[str, ...]
    phase: str
    pid: int | None = None
    has_record: bool = True  # False: found by its marker, no record (an orphan)
    restarts: int = 0
    started_at: float | None = None  # unix time
    exit_code: int | None = None
    last_error: str | None = None
    pids: tuple[int, ...] = ()  # every live process of the worker (its process group)
    env: tuple[tuple[str, str], ...] = ()  # as recorded: literals and ${NAME} references

    @property
    def running(self) -> bool:
        return self.phase in RUNNING_PHASES

    def to_json(self) -> dict:
        data = asdict(self)
        data["gpus"] = list(self.gpus)
        data["argv"] = list(self.argv)
        data["pids"] = list(self.pids)
        data["env"] = {k: v for k, v in self.env}
        return data


@dataclass(frozen=True)
class Observed:
    workers: tuple[ObservedWorker, ...] = ()
    source: str = "none"
    notes: tuple[str, ...] = field(default=())

    def get(self, worker_id: str) -> ObservedWorker | None:
        index = self.__dict__.get("_index")
        if index is None:  # built once per snapshot: reconcile looks up every worker
            index = {w.worker_id: w for w in reversed(self.workers)}
            object.__setattr__(self, "_index", index)
        return index.get(worker_id)

    def of_garden(self, garden: str) -> "Observed":
        return Observed(tuple(w for w in self.workers if w.garden == garden), self.source,
                        self.notes)

    def holdings(self) -> list[Holding]:
        """Running workers, as claims the planner must respect."""
        return [
            Holding(worker_id=w.worker_id, model=w.model, node=w.node, gpus=w.gpus,
                    utilization=w.utilization, claim_bytes=w.claim_bytes,
                    sizing_hash=w.sizing_hash)
            for w in self.workers if w.running
        ]

    def ports(self) -> dict[str, int]:
        return {w.worker_id: w.port for w in self.workers}

    def fingerprint(self) -> str:
        """Changes when a worker appears, disappears, changes spec or starts/stops running."""
        shape = sorted([w.worker_id, w.spec_hash, w.running, w.pid] for w in self.workers)
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]
