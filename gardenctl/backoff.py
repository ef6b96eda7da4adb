"""Crash-loop backoff for `watch`: when a worker that keeps failing may be started again.

The first restart after a crash is immediate; after that the wait starts at 10 s and doubles up
to 5 minutes; a worker that stays ready for 10 minutes starts over. Values, not I/O: the
watcher feeds in what it observed and the time; everything here is a pure decision on that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gardenctl.observe import CRASHED, READY, Observed


@dataclass(frozen=True)
class BackoffPolicy:
    first: float = 10.0
    factor: float = 2.0
    maximum: float = 300.0
    reset_after: float = 600.0

    def delay(self, failures: int) -> float:
        """Seconds to wait before the next start, after ``failures`` failures in a row."""
        if failures <= 1:
            return 0.0
        return min(self.maximum, self.first * self.factor ** (failures - 2))


@dataclass
class WorkerBackoff:
    failures: int = 0
    not_before: float = 0.0  # wall-clock time
    last_error: str = ""
    counted_until: float = float("-inf")  # crashes of processes started before this are counted
    spec_hash: str | None = None  # the version of the worker that failed


@dataclass
class CrashTracker:
    """Failures in a row per worker, and when each may be started again."""

    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    workers: dict[str, WorkerBackoff] = field(default_factory=dict)

    def observe(self, observed: Observed, now: float) -> None:
        """Count each crash once (by the start time of the process that crashed); forgive
        workers that have been ready for `reset_after`."""
        for worker in observed.workers:
            if worker.phase == CRASHED:
                entry = self.workers.get(worker.worker_id)
                if entry is None:  # first seen (maybe after a watcher restart): use its history
                    entry = WorkerBackoff(failures=worker.restarts)
                    self.workers[worker.worker_id] = entry
                started = worker.started_at if worker.started_at is not None else now
                if started > entry.counted_until:
                    entry.counted_until = started
                    entry.spec_hash = worker.spec_hash
                    self._fail(entry, now, worker.last_error or "exited")
            elif worker.phase == READY and worker.worker_id in self.workers:
                if worker.started_at is not None and now - worker.started_at >= self.policy.reset_after:
                    del self.workers[worker.worker_id]

    def start_failed(self, worker_id: str, now: float, error: str,
                     spec_hash: str | None = None) -> None:
        """A start that failed (its process, if any, began before ``now``: counted here)."""
        entry = self.workers.setdefault(worker_id, WorkerBackoff())
        entry.counted_until = max(entry.counted_until, now)
        entry.spec_hash = spec_hash or entry.spec_hash
        self._fail(entry, now, error)

    def reset_if_changed(self, worker_id: str, spec_hash: str) -> None:
        """A new version of the worker (another spec) starts with no failures behind it."""
        entry = self.workers.get(worker_id)
        if entry is not None and entry.spec_hash is not None and entry.spec_hash != spec_hash:
            del self.workers[worker_id]

    def _fail(self, entry: WorkerBackoff, now: float, error: str) -> None:
        entry.failures += 1
        entry.not_before = now + self.policy.delay(entry.failures)
        entry.last_error = error

    def held(self, worker_id: str, now: float) -> float | None:
        """Seconds until the worker may start again, or None if it may start now."""
        entry = self.workers.get(worker_id)
        if entry is None or entry.not_before <= now:
            return None
        return entry.not_before - now

    def next_due(self, since: float) -> float | None:
        """When the earliest worker held at ``since`` (or failed since then) may start again."""
        pending = [e.not_before for e in self.workers.values() if e.not_before >= since]
        return min(pending) if pending else None

    def forget(self, keep: set[str]) -> None:
        """Drop workers the garden no longer has."""
        for worker_id in list(self.workers):
            if worker_id not in keep:
                del self.workers[worker_id]

    def to_json(self, now: float) -> dict:
        return {
            worker_id: {
                "failures": e.failures,
                "next_start_after": e.not_before if e.not_before > now else None,
                "last_error": e.last_error,
            }
            for worker_id, e in sorted(self.workers.items())
        }
