"""Crash-loop backoff: when a worker that keeps failing may be started again.

Kubelet's rule: the first restart after a failure is immediate; after that the wait starts at
10 s and doubles up to 5 minutes; a run that stayed ready for 10 minutes starts the count over.
Pure: the planner applies it to what a worker's record says of its runs (`streak`: failed runs
in a row before this one; when this run ended; when it became ready), so every gardenctl (apply,
watch, a restarted watch) reaches the same decision, and `status` can show it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gardenctl.observe import ObservedWorker


@dataclass(frozen=True)
class BackoffPolicy:
    first: float = 10.0
    factor: float = 2.0
    maximum: float = 300.0
    reset_after: float = 600.0

    def delay(self, failures: int) -> float:
        """Seconds to wait before the next start, after ``failures`` failed runs in a row."""
        if failures <= 1:
            return 0.0
        return float(min(self.maximum, self.first * self.factor ** (failures - 2)))


def failures_in_a_row(worker: ObservedWorker, policy: BackoffPolicy, now: float) -> int:
    """Failed runs in a row, counting the current run if it is over (or about to be ended:
    unhealthy, or past its start timeout). A run that had stayed ready for `reset_after`
    before it ended starts the count over."""
    ended_at = worker.exited_at if worker.exited_at is not None else now
    if worker.ready_at is not None and ended_at - worker.ready_at >= policy.reset_after:
        return 1
    return worker.streak + 1


def next_start_at(worker: ObservedWorker, policy: BackoffPolicy, now: float) -> float | None:
    """The wall-clock time before which the worker may not start again; None: it may now."""
    delay = policy.delay(failures_in_a_row(worker, policy, now))
    ended_at = worker.exited_at if worker.exited_at is not None else now
    until = ended_at + delay
    return until if delay and until > now else None


__all__ = ["BackoffPolicy", "failures_in_a_row", "next_start_at"]
