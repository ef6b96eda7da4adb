"""Stopping a whole garden (`down`): every recorded or marked worker, in parallel."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from gardenctl.errors import GardenError
from gardenctl.execute import StepResult
from gardenctl.observe import History, ObservedWorker
from gardenctl.runtime.base import Runtime
from gardenctl.spec.models import Garden
from gardenctl.state import StateDir
from gardenctl.vocab import Outcome, StepKind


def open_for_down(spec: Garden | None, state: StateDir, garden: str) -> Runtime:
    """The runtime that holds the garden's workers: the state directory's processes, or the
    Ray cluster its file (or --runtime) names; it may update the records of ``garden`` only."""
    from gardenctl.runtime import open_runtime, runtime_spec

    if runtime_spec(spec).kind == "ray":
        return open_runtime(spec, None, state, gardens={garden})
    from gardenctl.runtime.local import LocalRuntime

    return LocalRuntime(state, node="")


def workers_of(runtime: Runtime, garden: str) -> list[ObservedWorker]:
    return [w for w in runtime.observe(confirm_health=False).workers if w.garden == garden]


def stop_garden(state: StateDir, runtime: Runtime, garden: str,
                workers: list[ObservedWorker]) -> list[StepResult]:
    """Stop ``workers`` (the garden's) and remember it, so that plans say the workers are down
    because of `down`, not because they are new."""
    before = state.read_history(garden)
    state.write_history(garden, History(
        applied_at=before.applied_at, applied_by=before.applied_by,
        applied_workers=before.applied_workers, down_at=time.time(),
        down_workers=frozenset(w.worker_id for w in workers) | before.applied_workers))

    def stop(worker: ObservedWorker) -> StepResult:
        try:
            result = runtime.stop(worker.worker_id)  # also ends what a dead worker left behind
        except GardenError as exc:
            return StepResult(worker.worker_id, StepKind.STOP, Outcome.STOP_FAILED, str(exc))
        if result.outcome == "gone":
            return StepResult(worker.worker_id, StepKind.STOP, Outcome.OK,
                              "already exited; record removed")
        return StepResult(worker.worker_id, StepKind.STOP, Outcome.OK,
                          result.detail or result.outcome)

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(workers)))) as pool:
        return sorted(pool.map(stop, workers), key=lambda r: r.worker_id)
