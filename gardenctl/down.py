"""Stopping a whole garden (`down`): every recorded or marked worker, in parallel."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from gardenctl.errors import GardenError
from gardenctl.execute import OK, STOP_FAILED, ActionResult
from gardenctl.observe import ObservedWorker
from gardenctl.runtime.local import LocalRuntime
from gardenctl.state import StateDir


def workers_of(state: StateDir, garden: str) -> list[ObservedWorker]:
    runtime = LocalRuntime(state, node="")
    return [w for w in runtime.observe().workers if w.garden == garden]


def stop_garden(state: StateDir, workers: list[ObservedWorker]) -> list[ActionResult]:
    runtime = LocalRuntime(state, node="")

    def stop(worker: ObservedWorker) -> ActionResult:
        try:
            result = runtime.stop(worker.worker_id)  # also ends what a dead worker left behind
        except GardenError as exc:
            return ActionResult(worker.worker_id, "stop", False, STOP_FAILED, str(exc))
        if result.outcome == "gone":
            return ActionResult(worker.worker_id, "stop", True, OK, "already exited; record removed")
        return ActionResult(worker.worker_id, "stop", True, OK, result.detail or result.outcome)

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(workers)))) as pool:
        return sorted(pool.map(stop, workers), key=lambda r: r.worker_id)
