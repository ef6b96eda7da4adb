"""The apply schedule: vLLM's rules about what may happen at once on a shared GPU."""

from __future__ import annotations

from gardenctl.execute.schedule import AWAIT, START, STOP, Scheduler, Step


def step(kind, worker, *gpus, after=None):
    return Step(kind, worker, frozenset(("n", g) for g in gpus), after=after)


def names(steps):
    return [s.key for s in steps]


def test_two_starts_on_one_gpu_run_one_after_the_other():
    a, b = step(START, "a", 0), step(START, "b", 0)
    scheduler = Scheduler([a, b])
    assert names(scheduler.next_runnable()) == ["start:a"]
    assert scheduler.next_runnable() == []
    scheduler.finished(a, True)
    assert names(scheduler.next_runnable()) == ["start:b"]


def test_different_gpus_run_in_parallel():
    scheduler = Scheduler([step(START, "a", 0), step(START, "b", 1), step(START, "c", 2)])
    assert names(scheduler.next_runnable()) == ["start:a", "start:b", "start:c"]


def test_stops_overlap_each_other_but_starts_wait_for_them():
    s1, s2, go = step(STOP, "x", 0), step(STOP, "y", 0), step(START, "z", 0)
    scheduler = Scheduler([s1, s2, go])
    assert names(scheduler.next_runnable()) == ["stop:x", "stop:y"]
    scheduler.finished(s1, True)
    assert scheduler.next_runnable() == []
    scheduler.finished(s2, True)
    assert names(scheduler.next_runnable()) == ["start:z"]


def test_nothing_stops_on_a_gpu_where_a_worker_is_still_loading():
    loading, stop, other = step(AWAIT, "l", 0), step(STOP, "x", 0), step(STOP, "y", 1)
    scheduler = Scheduler([loading, stop, other])
    assert names(scheduler.next_runnable()) == ["await:l", "stop:y"]
    scheduler.finished(loading, True)
    assert names(scheduler.next_runnable()) == ["stop:x"]


def test_a_replace_starts_after_its_stop_even_on_other_gpus():
    old = step(STOP, "r", 0)
    new = step(START, "r", 1, after="stop:r")
    scheduler = Scheduler([old, new])
    assert names(scheduler.next_runnable()) == ["stop:r"]
    scheduler.finished(old, True)
    assert names(scheduler.next_runnable()) == ["start:r"]


def test_a_replace_whose_stop_failed_never_starts():
    old = step(STOP, "r", 0)
    new = step(START, "r", 0, after="stop:r")
    scheduler = Scheduler([old, new])
    scheduler.next_runnable()
    scheduler.finished(old, False)
    assert names(scheduler.orphaned()) == ["start:r"]
    assert scheduler.pending == [] and scheduler.idle


def test_a_later_step_never_overtakes_a_waiting_one_on_the_same_gpu():
    # a TP stop on GPUs 0+1 waits for a load on GPU 0; a start on GPU 1 must not slip in first
    loading = step(AWAIT, "l", 0)
    tp_stop = step(STOP, "tp", 0, 1)
    start = step(START, "s", 1)
    scheduler = Scheduler([loading, tp_stop, start])
    assert names(scheduler.next_runnable()) == ["await:l"]
    scheduler.finished(loading, True)
    assert names(scheduler.next_runnable()) == ["stop:tp"]
    scheduler.finished(tp_stop, True)
    assert names(scheduler.next_runnable()) == ["start:s"]
