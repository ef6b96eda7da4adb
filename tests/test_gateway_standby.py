"""Standby models behind the gateway: the rule of who may be awake (pure)."""

from __future__ import annotations

import math

from gardenctl.gateway.standby import (
    ASLEEP,
    AWAKE,
    SLEEPING,
    UNKNOWN,
    WAKING,
    Evict,
    Fits,
    Sleeper,
    Wait,
    expired,
    make_room,
    next_expiry,
    overcommitted,
    wake_slots,
)

GiB = 1024**3
GPU0 = ("n", 0)
GPU1 = ("n", 1)


# -- the rule (pure) -------------------------------------------------------------------------

def sleeper(worker_id: str, state: str, *, awake: int = 6, asleep: int = 2,
            gpus: tuple = (GPU0,), in_flight: int = 0, last_used: float = 0.0,
            priority: int = 0, idle_timeout: float = math.inf) -> Sleeper:
    return Sleeper(worker_id, gpus, awake * GiB, asleep * GiB, state, in_flight, last_used,
                   priority, idle_timeout)


def test_the_slot_is_the_largest_growth_of_every_standby_worker_on_the_gpu():
    workers = [sleeper("a", ASLEEP, awake=6, asleep=2), sleeper("b", AWAKE, awake=4, asleep=1),
               sleeper("c", ASLEEP, awake=9, asleep=2, gpus=(GPU0, GPU1))]

    assert wake_slots(workers) == {GPU0: 7 * GiB, GPU1: 7 * GiB}


def test_a_worker_that_fits_beside_the_awake_ones_is_woken_at_once():
    workers = [sleeper("big", ASLEEP, awake=10, asleep=2),  # slot 8
               sleeper("a", AWAKE, awake=5, asleep=1), sleeper("b", ASLEEP, awake=5, asleep=1)]

    assert make_room("b", workers) == Fits()  # 4 + 4 <= 8


def test_idle_workers_sleep_least_recently_used_first_then_lower_priority_then_id():
    workers = [sleeper("t", ASLEEP, awake=6, asleep=2),  # slot 4: one awake at a time...
               sleeper("old", AWAKE, awake=4, asleep=3, last_used=1.0),  # ... of growth 4,
               sleeper("new", AWAKE, awake=4, asleep=3, last_used=9.0),  # or four of growth 1
               sleeper("lo", AWAKE, awake=4, asleep=3, last_used=5.0, priority=-1),
               sleeper("hi", AWAKE, awake=4, asleep=3, last_used=5.0, priority=1)]

    assert make_room("t", workers) == Evict(("old", "lo", "hi", "new"))
    assert make_room("t", workers[:3]) == Evict(("old", "new"))
    ties = [sleeper("t", ASLEEP), sleeper("y", AWAKE, awake=4, asleep=3),
            sleeper("x", AWAKE, awake=4, asleep=3), sleeper("z", AWAKE, awake=4, asleep=3)]
    assert make_room("t", ties) == Evict(("x", "y", "z"))


def test_only_as_many_are_put_to_sleep_as_the_slot_needs():
    workers = [sleeper("t", ASLEEP, awake=4, asleep=2),
               sleeper("big", ASLEEP, awake=8, asleep=2),  # slot 6
               sleeper("x", AWAKE, awake=4, asleep=2, last_used=1.0),
               sleeper("y", AWAKE, awake=4, asleep=2, last_used=2.0),
               sleeper("z", AWAKE, awake=4, asleep=2, last_used=3.0)]

    assert make_room("t", workers) == Evict(("x",))  # 2 + 2 + 2 <= 6 once x sleeps


def test_a_busy_worker_is_never_chosen_the_wake_up_waits():
    workers = [sleeper("a", AWAKE, in_flight=1), sleeper("b", ASLEEP)]

    decision = make_room("b", workers)

    assert isinstance(decision, Wait) and decision.blockers == ("a",)
    assert "answering requests: a" in decision.why


def test_nothing_is_put_to_sleep_when_that_would_not_be_enough():
    workers = [sleeper("t", ASLEEP, awake=6, asleep=2),
               sleeper("idle", AWAKE, awake=4, asleep=2, last_used=0.0),
               sleeper("busy", AWAKE, awake=4, asleep=2, in_flight=2)]

    assert make_room("t", workers) == Wait(("busy",), "answering requests: busy")


def test_waking_sleeping_and_unknown_workers_hold_their_memory():
    for state in (WAKING, SLEEPING, UNKNOWN):
        decision = make_room("b", [sleeper("a", state), sleeper("b", ASLEEP)])
        assert isinstance(decision, Wait) and decision.blockers == ("a",), state
    assert isinstance(make_room("b", [sleeper("b", SLEEPING)]), Wait)  # first asleep, then up
    assert make_room("a", [sleeper("a", ASLEEP), sleeper("b", ASLEEP)]) == Fits()


def test_a_worker_on_two_gpus_needs_room_on_both():
    workers = [sleeper("wide", ASLEEP, awake=6, asleep=2, gpus=(GPU0, GPU1)),
               sleeper("left", AWAKE, awake=6, asleep=2, gpus=(GPU0,), last_used=2.0),
               sleeper("right", AWAKE, awake=6, asleep=2, gpus=(GPU1,), last_used=1.0)]

    assert make_room("wide", workers) == Evict(("right", "left"))
    busy_right = [workers[0], workers[1], sleeper("right", AWAKE, gpus=(GPU1,), in_flight=1)]
    assert make_room("wide", busy_right) == Wait(("right",), "answering requests: right")


def test_overcommitted_gpus_shed_their_least_recently_used_idle_workers():
    workers = [sleeper("a", AWAKE, last_used=3.0), sleeper("b", AWAKE, last_used=1.0),
               sleeper("c", AWAKE, last_used=2.0, in_flight=1),
               sleeper("d", AWAKE, gpus=(GPU1,))]

    assert overcommitted(workers) == ("b", "a")  # c is busy: GPU0 stays over until it ends
    assert overcommitted([sleeper("a", AWAKE), sleeper("b", ASLEEP)]) == ()
    assert overcommitted([sleeper("a", AWAKE), sleeper("b", UNKNOWN)]) == ()


def test_idle_timeout_expires_idle_awake_workers_only():
    workers = [sleeper("a", AWAKE, last_used=0.0, idle_timeout=10.0),
               sleeper("b", AWAKE, last_used=5.0, idle_timeout=10.0),
               sleeper("busy", AWAKE, last_used=0.0, idle_timeout=1.0, in_flight=1),
               sleeper("c", ASLEEP, last_used=0.0, idle_timeout=1.0)]

    assert expired(workers, now=12.0) == ("a",)
    assert next_expiry(workers) == 10.0
    assert next_expiry([sleeper("x", AWAKE)]) is None  # no timeout: never
