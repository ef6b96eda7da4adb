"""Crash-loop backoff: first restart at once, then 10 s doubling to 5 min, reset after 10 min."""

from __future__ import annotations

from gardenctl.backoff import BackoffPolicy, CrashTracker
from gardenctl.observe import Observed, ObservedWorker


def worker(phase: str, started_at: float, restarts: int = 0) -> ObservedWorker:
    return ObservedWorker(worker_id="g/m/0", garden="g", model="m", replica=0, node="n",
                          gpus=(0,), port=8001, utilization=0.5, claim_bytes=1, spec_hash="s",
                          sizing_hash="z", argv=(), phase=phase, pid=100 + int(started_at),
                          started_at=started_at, restarts=restarts, last_error="boom")


def test_delays_grow_from_immediate_to_five_minutes():
    policy = BackoffPolicy()
    assert [policy.delay(n) for n in range(1, 9)] == [0, 10, 20, 40, 80, 160, 300, 300]


def test_first_crash_restarts_at_once_then_waits():
    tracker = CrashTracker()
    tracker.observe(Observed((worker("crashed", 0.0),)), now=5.0)
    assert tracker.held("g/m/0", 5.0) is None
    tracker.start_failed("g/m/0", now=6.0, error="oom")
    assert tracker.held("g/m/0", 6.0) == 10.0
    assert tracker.next_due(6.0) == 16.0


def test_a_crash_is_counted_once_however_often_it_is_observed():
    tracker = CrashTracker()
    for now in (5.0, 6.0, 7.0):
        tracker.observe(Observed((worker("crashed", 0.0),)), now=now)
    assert tracker.workers["g/m/0"].failures == 1


def test_the_crash_of_a_failed_start_is_not_counted_twice():
    tracker = CrashTracker()
    tracker.start_failed("g/m/0", now=10.0, error="exited before ready")
    tracker.observe(Observed((worker("crashed", 9.5),)), now=11.0)  # that same process
    assert tracker.workers["g/m/0"].failures == 1


def test_ten_minutes_ready_forgives_past_crashes():
    tracker = CrashTracker()
    tracker.start_failed("g/m/0", now=0.0, error="x")
    tracker.start_failed("g/m/0", now=1.0, error="x")
    tracker.observe(Observed((worker("ready", 100.0),)), now=500.0)
    assert "g/m/0" in tracker.workers
    tracker.observe(Observed((worker("ready", 100.0),)), now=700.0)
    assert "g/m/0" not in tracker.workers


def test_a_restarted_watcher_continues_from_the_recorded_restart_count():
    tracker = CrashTracker()
    tracker.observe(Observed((worker("crashed", 0.0, restarts=3),)), now=1.0)
    assert tracker.workers["g/m/0"].failures == 4
    assert tracker.held("g/m/0", 1.0) == 40.0
