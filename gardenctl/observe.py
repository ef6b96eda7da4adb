"""What runs now: a snapshot of the workers, taken once per plan by a runtime's `observe()`.

The reconciler and the planner only ever see this snapshot (never live processes), so a plan is
a pure function of (garden, inventory, observed, the time and the environment's names).

An `ObservedWorker` is the version of the worker that runs (`spec`, a `DesiredWorker` as it was
started) plus what the runtime saw of its life: phase, processes, restarts, the end of its last
run. It is built from a record in exactly one place (`gardenctl.state.WorkerRecord.observed`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gardenctl.placement.model import Holding
from gardenctl.vocab import Cause, Phase
from gardenctl.workers import DesiredWorker


@dataclass(frozen=True)
class Rejection:
    """A newer version of a worker that failed to become ready and was rolled back."""

    spec_hash: str
    reason: str
    at: float  # wall-clock time of the rollback

    def to_json(self) -> dict[str, Any]:
        return {"spec_hash": self.spec_hash, "reason": self.reason, "at": self.at}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Rejection | None:
        if not data:
            return None
        return cls(str(data["spec_hash"]), str(data["reason"]), float(data["at"]))


@dataclass(frozen=True)
class ObservedWorker:
    spec: DesiredWorker  # the version that runs (or ran last)
    phase: Phase
    pid: int | None = None
    pids: tuple[int, ...] = ()  # every live process of the worker (its process group)
    has_record: bool = True  # False: found by its marker, no record (an orphan)
    restarts: int = 0  # how many times it was started again after a failure (like k8s)
    streak: int = 0  # failed runs in a row before this run (for the crash-loop backoff)
    started_at: float | None = None  # wall-clock times
    ready_at: float | None = None
    exited_at: float | None = None
    exit_code: int | None = None
    last_error: str | None = None
    cause: Cause | None = None
    hint: str = ""
    previous: DesiredWorker | None = None  # the version this run replaced, until it is ready
    rejected: Rejection | None = None  # a newer version that failed and was rolled back
    in_flight: bool = False  # this gardenctl is stopping or starting it right now
    health: str = ""  # why its last health probe failed, when it did
    facts: tuple[tuple[str, Any], ...] = ()  # numbers read from a failed run's log

    def fact(self, name: str) -> Any:
        return dict(self.facts).get(name)

    # -- the spec, for readers ---------------------------------------------------------------

    @property
    def worker_id(self) -> str:
        return self.spec.worker_id

    @property
    def garden(self) -> str:
        return self.spec.garden

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def replica(self) -> int:
        return self.spec.replica

    @property
    def node(self) -> str:
        return self.spec.node

    @property
    def gpus(self) -> tuple[int, ...]:
        return self.spec.gpus

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def utilization(self) -> float:
        return self.spec.utilization

    @property
    def claim_bytes(self) -> int:
        return self.spec.claim_bytes

    @property
    def spec_hash(self) -> str:
        return self.spec.spec_hash

    @property
    def sizing_hash(self) -> str:
        return self.spec.sizing_hash

    @property
    def argv(self) -> tuple[str, ...]:
        return self.spec.argv

    @property
    def env(self) -> tuple[tuple[str, str], ...]:
        return self.spec.env

    @property
    def running(self) -> bool:
        return self.phase.running

    @property
    def ever_ready(self) -> bool:
        return self.ready_at is not None

    def rejected_for(self, worker: DesiredWorker) -> bool:
        """``worker``'s version is the one this worker's replacement failed with."""
        return self.rejected is not None and self.rejected.spec_hash == worker.spec_hash

    def to_json(self) -> dict[str, Any]:
        return {
            "worker": self.worker_id, "phase": self.phase.value, "pid": self.pid,
            "pids": list(self.pids), "has_record": self.has_record, "restarts": self.restarts,
            "streak": self.streak, "started_at": self.started_at, "ready_at": self.ready_at,
            "exited_at": self.exited_at, "exit_code": self.exit_code,
            "last_error": self.last_error, "cause": self.cause.value if self.cause else None,
            "hint": self.hint, "in_flight": self.in_flight, "health": self.health,
            "previous": self.previous.to_json() if self.previous else None,
            "rejected": self.rejected.to_json() if self.rejected else None,
            "spec": self.spec.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ObservedWorker:
        previous = data.get("previous")
        cause = data.get("cause")
        return cls(
            spec=DesiredWorker.from_json(data["spec"]), phase=Phase(data["phase"]),
            pid=data.get("pid"), pids=tuple(data.get("pids", ())),
            has_record=bool(data.get("has_record", True)), restarts=int(data.get("restarts", 0)),
            streak=int(data.get("streak", 0)), started_at=data.get("started_at"),
            ready_at=data.get("ready_at"), exited_at=data.get("exited_at"),
            exit_code=data.get("exit_code"), last_error=data.get("last_error"),
            cause=Cause(cause) if cause else None, hint=str(data.get("hint", "")),
            in_flight=bool(data.get("in_flight", False)), health=str(data.get("health", "")),
            previous=DesiredWorker.from_json(previous) if previous else None,
            rejected=Rejection.from_json(data.get("rejected")),
        )


@dataclass(frozen=True)
class History:
    """What was last done to a garden as a whole: for plans that say why a worker is missing."""

    applied_at: float | None = None
    applied_by: str = ""
    applied_workers: frozenset[str] = field(default_factory=frozenset)
    down_at: float | None = None
    down_workers: frozenset[str] = field(default_factory=frozenset)

    def to_json(self) -> dict[str, Any]:
        return {"applied_at": self.applied_at, "applied_by": self.applied_by,
                "applied_workers": sorted(self.applied_workers), "down_at": self.down_at,
                "down_workers": sorted(self.down_workers)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> History:
        return cls(applied_at=data.get("applied_at"), applied_by=str(data.get("applied_by", "")),
                   applied_workers=frozenset(data.get("applied_workers") or ()),
                   down_at=data.get("down_at"),
                   down_workers=frozenset(data.get("down_workers") or ()))


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
        found: ObservedWorker | None = index.get(worker_id)
        return found

    def of_garden(self, garden: str) -> Observed:
        return Observed(tuple(w for w in self.workers if w.garden == garden), self.source,
                        self.notes)

    def others_than(self, garden: str) -> Observed:
        return Observed(tuple(w for w in self.workers if w.garden != garden), self.source,
                        self.notes)

    def holdings(self) -> list[Holding]:
        """Claims the planner must respect: running workers, and dead ones that keep their
        place while they are restarted (a crash does not give its GPU away)."""
        return [
            Holding(worker_id=w.worker_id, model=w.model, node=w.node, gpus=w.gpus,
                    utilization=w.utilization, claim_bytes=w.claim_bytes,
                    sizing_hash=w.sizing_hash,
                    asleep_bytes=w.spec.standby.asleep_bytes if w.spec.standby else None)
            for w in self.workers if w.running or (w.has_record and w.phase.dead)
        ]

    def ports(self) -> dict[str, int]:
        return {w.worker_id: w.port for w in self.workers}

    def with_in_flight(self, worker_ids: frozenset[str]) -> Observed:
        """The snapshot with the workers this gardenctl is acting on marked in flight."""
        if not worker_ids:
            return self
        return Observed(tuple(replace(w, in_flight=True) if w.worker_id in worker_ids else w
                              for w in self.workers), self.source, self.notes)

    def fingerprint(self) -> str:
        """Changes when a worker appears, disappears, changes spec, phase or process."""
        shape = sorted([w.worker_id, w.spec_hash, w.phase.value, w.pid, w.streak]
                       for w in self.workers)
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]


__all__ = ["History", "Observed", "ObservedWorker", "Rejection"]
