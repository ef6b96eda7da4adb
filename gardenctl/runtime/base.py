"""What a runtime does (local processes, Ray actors, the in-memory fake), and what it reports.

A runtime carries no decision logic: it observes, spawns, checks and stops workers when told.
The executor (gardenctl.execute) decides nothing either: it runs the plan's actions in the
order vLLM's rules require. The same contract tests run against every runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

from gardenctl.errors import GardenError
from gardenctl.observe import Observed, ObservedWorker
from gardenctl.runtime.diagnose import Diagnosis
from gardenctl.workers import DesiredWorker

# WorkerStatus.phase
STARTING = "starting"
READY = "ready"
EXITED = "exited"


@dataclass(frozen=True)
class WorkerStatus:
    """One look at a starting or running worker."""

    phase: str  # starting | ready | exited
    detail: str = ""  # what it is doing now, e.g. "loading weights"
    exit_code: int | None = None  # set when exited normally
    signal: int | None = None  # set when killed by a signal
    log_tail: str = ""  # last lines of its log (exited only)
    diagnosis: Diagnosis | None = None  # recognised cause (exited only)


@dataclass(frozen=True)
class StopResult:
    outcome: str  # "stopped" (drained on SIGTERM) | "killed" (SIGKILL needed) | "gone"
    pids: tuple[int, ...] = ()  # the processes it had, to check GPU memory was released
    detail: str = ""


class SpawnError(GardenError):
    """A worker could not even be started (command not found, port taken, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class StopError(GardenError):
    """A worker's processes survived SIGKILL, or its identity could not be verified."""


class Runtime(Protocol):
    name: str

    def observe(self) -> Observed:
        """Every worker this runtime knows of (all gardens), each with its phase."""

    def spawn(self, worker: DesiredWorker, env: Mapping[str, str], restarts: int = 0) -> None:
        """Start the worker's process(es) and record it; SpawnError when it cannot start.

        ``env`` is the worker's environment with secret references resolved."""

    def check(self, worker_id: str) -> WorkerStatus:
        """Is the worker still starting, ready (health 200 and its name in /v1/models) or gone?"""

    def stop(self, worker_id: str, grace: float) -> StopResult:
        """SIGTERM, wait ``grace`` seconds, SIGKILL the whole group, verify nothing survives.
        Removes the worker's record."""

    def adopt(self, worker: ObservedWorker, desired: DesiredWorker) -> None:
        """Record a worker found running by its marker (no record) as the garden wants it."""

    def log_path(self, worker_id: str) -> str | None:
        """Where the worker's output goes, if the runtime keeps it in a file."""

    def dead_workers(self) -> set[tuple[str, int | None]]:
        """(worker id, pid) of workers believed running whose process is gone. Cheap (no HTTP,
        no process scan): `watch` calls it every second to notice a death quickly."""


class GpuProbe(Protocol):
    """Live GPU memory facts (NVML); absent for simulated GPUs."""

    def free_bytes(self, node: str, index: int) -> int: ...

    def pids_on(self, node: str, index: int) -> set[int]: ...
