"""The executor's schedule: which steps may begin, from what each waits for."""

from __future__ import annotations

from gardenctl.execute.schedule import Schedule
from gardenctl.plan.model import Needs, Step, When
from gardenctl.vocab import StepKind


def step(kind: StepKind, worker: str, *after: Needs) -> Step:
    return Step(kind, f"g/{worker}/0", worker, "test", after=after)


def ids(steps):
    return [s.id for s in steps]


def test_steps_that_wait_for_nothing_begin_together():
    schedule = Schedule.of([step(StepKind.START, "a"), step(StepKind.START, "b")])
    assert ids(schedule.runnable()) == ["start:g/a/0", "start:g/b/0"]
    assert schedule.runnable() == []


def test_a_step_begins_once_what_it_needs_is_done():
    first = step(StepKind.STOP, "a")
    then = step(StepKind.START, "b", Needs(first.id, When.DONE))
    schedule = Schedule.of([first, then])
    assert ids(schedule.runnable()) == [first.id]
    schedule.finished(first, ok=True)
    assert ids(schedule.runnable()) == [then.id]


def test_a_step_whose_need_failed_is_dropped_as_skipped_and_so_is_what_needs_it():
    first = step(StepKind.STOP, "a")
    then = step(StepKind.START, "b", Needs(first.id, When.DONE))
    after = step(StepKind.START, "c", Needs(then.id, When.DONE))
    schedule = Schedule.of([first, then, after])
    schedule.runnable()
    schedule.finished(first, ok=False)
    dropped = schedule.drop_unreachable()
    assert [(d.step.id, d.skipped) for d in dropped] == [(then.id, True), (after.id, True)]
    assert schedule.done


def test_a_step_that_only_needs_the_gpu_free_goes_on_after_a_failure():
    first = step(StepKind.START, "a")
    then = step(StepKind.START, "b", Needs(first.id, When.FINISHED))
    schedule = Schedule.of([first, then])
    schedule.runnable()
    schedule.finished(first, ok=False)
    assert schedule.drop_unreachable() == []
    assert ids(schedule.runnable()) == [then.id]


def test_a_rollback_runs_only_if_its_replacement_failed():
    for replaced_ok in (True, False):
        replace = step(StepKind.REPLACE, "m")
        rollback = step(StepKind.ROLLBACK, "m", Needs(replace.id, When.FAILED))
        schedule = Schedule.of([replace, rollback])
        assert ids(schedule.runnable()) == [replace.id]
        schedule.finished(replace, ok=replaced_ok)
        dropped = schedule.drop_unreachable()
        if replaced_ok:
            assert [(d.step.id, d.skipped) for d in dropped] == [(rollback.id, False)]
        else:
            assert ids(schedule.runnable()) == [rollback.id]


def test_a_rollback_of_a_replacement_that_never_ran_is_not_run():
    gate = step(StepKind.REPLACE, "first")
    replace = step(StepKind.REPLACE, "m", Needs(gate.id, When.DONE))
    rollback = step(StepKind.ROLLBACK, "m", Needs(replace.id, When.FAILED))
    later = step(StepKind.START, "x", Needs(replace.id, When.FINISHED),
                 Needs(rollback.id, When.FINISHED))
    schedule = Schedule.of([gate, replace, rollback, later])
    schedule.runnable()
    schedule.finished(gate, ok=False)
    dropped = {d.step.id: d.skipped for d in schedule.drop_unreachable()}
    assert dropped == {replace.id: True, rollback.id: False}
    assert ids(schedule.runnable()) == [later.id]  # the GPU is free: it may go on


def test_steps_that_only_report_are_not_scheduled():
    schedule = Schedule.of([step(StepKind.HOLD, "a"), step(StepKind.WAIT, "b"),
                            step(StepKind.KEEP, "c")])
    assert schedule.done and schedule.runnable() == []


def test_a_need_outside_the_plan_counts_as_met():
    lonely = step(StepKind.START, "a", Needs("stop:g/gone/0", When.DONE))
    assert ids(Schedule.of([lonely]).runnable()) == [lonely.id]
