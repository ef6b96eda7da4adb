"""What a runtime does (local processes, the in-memory fake), and what it reports.

A runtime carries no decision logic: it observes, spawns, checks, probes and stops workers when
told, and keeps each worker's record through the phases of `gardenctl.phases`. The planner
decides what to do; the executor (gardenctl.execute) runs the plan's steps in the order their
dependencies give. The same contract tests (tests/test_runtime_contract.py) run against every
runtime.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from gardenctl.errors import GardenError, TemporaryError
from gardenctl.observe import Observed, ObservedWorker
from gardenctl.plan.model import Launch
from gardenctl.runtime.diagnose import Diagnosis
from gardenctl.vocab import Cause, Phase
from gardenctl.workers import DesiredWorker


@dataclass(frozen=True)
class WorkerStatus:
    """One look at a worker: its phase now (STARTING, READY, or the phase its run ended in)."""

    phase: Phase
    detail: str = ""  # what it is doing now ("loading weights"), or why it ended
    exit_code: int | None = None  # set when it exited normally
    signal: int | None = None  # set when it was killed by a signal
    log_tail: str = ""  # last lines of its log (ended only)
    diagnosis: Diagnosis | None = None  # recognised cause (ended only)

    @property
    def ended(self) -> bool:
        return self.phase.dead


@dataclass(frozen=True)
class StopResult:
    outcome: str  # "stopped" (drained on SIGTERM) | "killed" (SIGKILL needed) | "gone"
    pids: tuple[int, ...] = ()  # the processes it had, to check GPU memory was released
    detail: str = ""


class SpawnError(GardenError):
    """A worker could not even be started (command not found, port taken, ...). The runtime
    has recorded the failed start before raising."""

    def __init__(self, cause: Cause, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.cause = cause
        self.hint = hint


class GpuBusy(TemporaryError):
    """Another worker (of any garden in the state directory) is loading or stopping on one of
    the GPUs: vLLM must not start there now. Nothing was recorded; try again later."""


class StopError(GardenError):
    """A worker's processes survived SIGKILL, or its identity could not be verified."""


class Runtime(Protocol):
    name: str
    node: str

    def observe(self, *, confirm_health: bool = True) -> Observed:
        """Every worker this runtime knows of (all gardens), each with its phase. With
        ``confirm_health``, a ready worker whose /health fails is probed again (its
        failure_threshold times, briefly) and observed UNHEALTHY if every probe fails;
        without it (watch, whose prober thread does this), its recorded phase stands."""
        ...

    def spawn(self, worker: DesiredWorker, env: Mapping[str, str], launch: Launch) -> None:
        """Start the worker's process(es) and record the run (``launch`` carries its history).
        ``env`` is the worker's garden environment with secret references resolved.
        GpuBusy when another worker loads or stops on its GPUs (nothing recorded); SpawnError
        when it cannot start (recorded as a failed start)."""
        ...

    def fail(self, worker: DesiredWorker, launch: Launch, reason: str, cause: Cause,
             hint: str = "") -> None:
        """Record a start that could not happen (the GPU never had room, its memory was
        never released): FAILED, counted like any failed run."""
        ...

    def check(self, worker_id: str) -> WorkerStatus:
        """Is the worker still starting, ready (health 200 and its name in /v1/models), or
        has its run ended? Records what it finds."""
        ...

    def stop(self, worker_id: str, *, keep: Phase | None = None, reason: str = "",
             cause: Cause = Cause.EXITED, grace: float | None = None) -> StopResult:
        """SIGTERM, wait ``grace`` seconds (default: its shutdown timeout + a margin), SIGKILL
        the whole group, verify nothing survives. The record is removed, or with ``keep``
        kept as an ended run (FAILED / CRASHED, with ``reason``) to be started again."""
        ...

    def adopt(self, worker: ObservedWorker, desired: DesiredWorker) -> None:
        """Record a worker found running by its marker (no record) as the garden wants it."""
        ...

    def gpus_busy(self, worker_id: str, node: str, gpus: Iterable[int]) -> str | None:
        """Why nothing may start or stop on these GPUs now (another worker than ``worker_id``,
        of any garden, loads or stops there), or None."""
        ...

    def probe_health(self, worker_id: str) -> str | None:
        """One liveness probe (/health): None when healthy, else why not."""
        ...

    def mark_unhealthy(self, worker_id: str, detail: str) -> None:
        """Record that a ready worker failed its liveness probes (the planner restarts it)."""
        ...

    def log_path(self, worker_id: str) -> str | None:
        """Where the worker's output goes, if the runtime keeps it in a file on this machine."""
        ...

    def read_log(self, worker_id: str, *, previous: bool = False,
                 limit: int = ...) -> str | None:
        """The worker's log, its last ``limit`` bytes (``previous``: of the run before), or
        None when it has none; wherever the runtime keeps it."""
        ...

    def startup_log(self, worker_id: str) -> str | None:
        """The head of the current run's log, where vLLM writes its start-up figures."""
        ...

    def put_to_sleep(self, worker_id: str) -> None:
        """Put a standby worker to sleep (vLLM's sleep mode, at its level) once its requests in
        flight are done. SleepModeError when it cannot."""
        ...

    def wake_up(self, worker_id: str) -> None:
        """Wake a sleeping standby worker (reloading its weights after a level-2 sleep).
        SleepModeError when it cannot."""
        ...

    def is_sleeping(self, worker_id: str) -> bool | None:
        """Whether a standby worker sleeps now; None when it does not say (not running, not
        standby, no answer)."""
        ...

    def dead_workers(self) -> set[tuple[str, int | None]]:
        """(worker id, pid) of workers believed running whose process is gone. Cheap (no HTTP,
        no process scan): `watch` calls it every second to notice a death quickly."""
        ...


class GpuProbe(Protocol):
    """Live GPU memory facts (NVML); absent for simulated GPUs."""

    def free_bytes(self, node: str, index: int) -> int: ...

    def pids_on(self, node: str, index: int) -> set[int]: ...


__all__ = ["GpuBusy", "GpuProbe", "Runtime", "SpawnError", "StopError", "StopResult",
           "WorkerStatus"]
