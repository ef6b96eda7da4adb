"""Crash-loop backoff: first restart at once, then 10 s doubling to 5 min, reset after 10 min
ready. Decided from the record's history alone, so every gardenctl agrees."""

from __future__ import annotations

from builders import garden_text, plan_for

from gardenctl.backoff import BackoffPolicy, failures_in_a_row, next_start_at
from gardenctl.observe import ObservedWorker
from gardenctl.vocab import Phase

SPEC = plan_for(garden_text("  - {name: m, model: org/m, max_model_len: 1024}\n")).steps[0].worker
POLICY = BackoffPolicy()


def worker(phase=Phase.CRASHED, *, streak=0, ready_at=None, exited_at=100.0) -> ObservedWorker:
    return ObservedWorker(spec=SPEC, phase=phase, streak=streak, ready_at=ready_at,
                          exited_at=exited_at if phase.dead else None, started_at=50.0)


def test_delays_grow_from_immediate_to_five_minutes():
    assert [POLICY.delay(n) for n in range(1, 9)] == [0, 10, 20, 40, 80, 160, 300, 300]


def test_the_first_failure_restarts_at_once_the_second_waits_ten_seconds():
    assert next_start_at(worker(streak=0), POLICY, now=100.5) is None
    assert next_start_at(worker(streak=1), POLICY, now=100.5) == 110.0
    assert next_start_at(worker(streak=1), POLICY, now=110.0) is None  # expired


def test_a_run_that_stayed_ready_ten_minutes_starts_the_count_over():
    long_run = worker(streak=5, ready_at=100.0 - 600)
    assert failures_in_a_row(long_run, POLICY, now=101.0) == 1
    short_run = worker(streak=5, ready_at=100.0 - 30)
    assert failures_in_a_row(short_run, POLICY, now=101.0) == 6


def test_a_run_still_going_counts_as_ended_now_when_it_is_to_be_restarted():
    stuck = worker(Phase.UNHEALTHY, streak=1)
    assert failures_in_a_row(stuck, POLICY, now=500.0) == 2
    assert next_start_at(stuck, POLICY, now=500.0) == 510.0
