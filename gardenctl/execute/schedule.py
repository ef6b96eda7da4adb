"""When each step of an apply may run, from vLLM's rules about shared GPUs (vLLM 0.32):

- a worker's memory profiling reads device-wide free memory: while one loads on a GPU, nothing
  else on that GPU may start *or stop* (a neighbour that frees memory aborts its start-up);
- stops on a GPU come before the starts planned on it (the memory must be released first), and
  stops may overlap each other;
- steps on different GPUs run in parallel;
- a replace's new worker starts only after its old one has stopped.

Steps are taken in plan order; a step never overtakes an earlier waiting step that shares a GPU
with it. Pure bookkeeping: the steps themselves run in threads that the caller provides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GpuKey = tuple[str, int]

AWAIT = "await"  # a worker still loading from an earlier run
STOP = "stop"
START = "start"


@dataclass
class Step:
    kind: str
    worker_id: str
    keys: frozenset[GpuKey]
    after: str | None = None  # the key of a step that must have succeeded first
    key: str = ""

    def __post_init__(self) -> None:
        self.key = self.key or f"{self.kind}:{self.worker_id}"


@dataclass
class Scheduler:
    pending: list[Step]
    running_exclusive: dict[GpuKey, int] = field(default_factory=dict)  # starts, awaits
    running_stops: dict[GpuKey, int] = field(default_factory=dict)
    succeeded: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)

    def next_runnable(self) -> list[Step]:
        """Steps that may begin now (removed from pending); they must be reported back with
        `finished` when done."""
        ready: list[Step] = []
        reserved: set[GpuKey] = set()  # GPUs of earlier steps still waiting: no overtaking
        for step in list(self.pending):
            if step.after is not None and step.after not in self.succeeded:
                reserved |= step.keys
                continue
            blocked = set(self.running_exclusive)
            if step.kind != STOP:
                blocked |= set(self.running_stops)
            if step.keys & (blocked | reserved):
                reserved |= step.keys
                continue
            self.pending.remove(step)
            ready.append(step)
            target = self.running_stops if step.kind == STOP else self.running_exclusive
            for gpu in step.keys:
                target[gpu] = target.get(gpu, 0) + 1
            if step.kind != STOP:
                reserved |= step.keys  # one start per GPU at a time
        return ready

    def finished(self, step: Step, ok: bool) -> None:
        target = self.running_stops if step.kind == STOP else self.running_exclusive
        for gpu in step.keys:
            target[gpu] -= 1
            if not target[gpu]:
                del target[gpu]
        (self.succeeded if ok else self.failed).add(step.key)

    def orphaned(self) -> list[Step]:
        """Pending steps that can never run because what they wait for failed (removed)."""
        lost = [s for s in self.pending if s.after is not None and s.after in self.failed]
        for step in lost:
            self.pending.remove(step)
        return lost

    @property
    def idle(self) -> bool:
        return not self.running_exclusive and not self.running_stops
