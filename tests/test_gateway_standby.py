"""Standby models behind the gateway: the rule of who may be awake (pure), then end to end:
stand-in workers started by the real `gardenctl apply` (asleep once ready), the gateway as a
child process, the real `openai` client. Two standby models share one GPU whose wake slot holds
only one of them awake. Every wait is on an event (a log line, a state, an answer)."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import re
import signal
import threading
from pathlib import Path

import openai
import pytest
from e2e_helpers import Garden, garden_at, http_get, model, wait_until
from gateway_helpers import (
    Gateway,
    keeper,
    observed,
    run_async,
    view_of,
    worker,
    write_garden,
)

from gardenctl.gateway.errors import GatewayError
from gardenctl.gateway.sleepers import Lease
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

e2e = pytest.mark.e2e
GiB = 1024**3
GPU0 = ("n", 0)
GPU1 = ("n", 1)


# -- the rule (pure) -------------------------------------------------------------------------

def sleeper(worker_id: str, state: str, *, awake: int = 6, asleep: int = 2,
            gpus: tuple = (GPU0,), in_flight: int = 0, last_used: float = 0.0,
            priority: int = 0, idle_timeout: float = math.inf, stops: bool = False) -> Sleeper:
    return Sleeper(worker_id, gpus, awake * GiB, asleep * GiB, state, in_flight, last_used,
                   priority, idle_timeout, stops)


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


def test_workers_going_to_sleep_are_waited_for_not_added_to():
    going = [sleeper("t", ASLEEP), sleeper("big", ASLEEP, awake=10),  # slot 8
             sleeper("x", SLEEPING, last_used=9.0), sleeper("y", AWAKE, last_used=1.0)]
    stopping = [sleeper("t", ASLEEP, asleep=0, stops=True),
                sleeper("x", SLEEPING, asleep=0, stops=True)]
    short = [sleeper("t", ASLEEP), sleeper("big", ASLEEP, awake=10),
             sleeper("x", SLEEPING, awake=4), sleeper("y", AWAKE, last_used=1.0),
             sleeper("z", AWAKE, last_used=2.0)]

    assert make_room("t", going) == Wait(("x",), "going to sleep: x")  # y may stay awake
    assert make_room("t", stopping) == Wait(("x",), "being stopped (standby: stop): x")
    assert make_room("t", short) == Evict(("y",))  # x's 2 and y's 4 make t's 4 fit
    assert overcommitted([sleeper("a", AWAKE), sleeper("b", SLEEPING)]) == ()


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


# -- the keeper (sleepers), with a fake runtime -----------------------------------------------

def test_keeper_asks_new_workers_once_and_again_after_a_restart():
    async def test() -> None:
        sleepers, runtime, _, _ = keeper({"a": True})
        await sleepers.sync(view_of(worker("a", pid=1)))
        await sleepers.sync(view_of(worker("a", pid=1)))
        first = sleepers.workers["g/a/0"]
        runtime.asleep["g/a/0"] = False
        await sleepers.sync(view_of(worker("a", pid=2)))
        await sleepers.sync(view_of(worker("a", pid=2)))

        assert first.state == ASLEEP and runtime.did("is_sleeping") == ["g/a/0"] * 2
        assert sleepers.workers["g/a/0"] is not first and sleepers.workers["g/a/0"].state == AWAKE
        await sleepers.sync(view_of())
        assert sleepers.workers == {}
    run_async(test)


def test_keeper_believes_a_new_worker_that_says_it_is_awake():
    async def test() -> None:
        # its owner recorded it READY only once asleep: awake now means someone woke it
        sleepers, runtime, _, _ = keeper({"a": False})
        view = view_of(worker("a"))
        await sleepers.sync(view)

        assert sleepers.routable(view.table.replicas("a")) == list(view.table.replicas("a"))
        assert isinstance(await sleepers.acquire("a", view.table.replicas("a"), 10), Lease)
        assert runtime.did("wake") == [] and runtime.did("is_sleeping") == ["g/a/0"]
    run_async(test)


def test_keeper_shares_one_wake_up_and_leases_the_awake_replica():
    async def test() -> None:
        sleepers, runtime, discovery, _ = keeper({"a": True})
        view = view_of(worker("a"))
        await sleepers.sync(view)
        replicas = view.table.replicas("a")

        leases = await asyncio.gather(*(sleepers.acquire("a", replicas, 5) for _ in range(3)))

        assert runtime.did("wake") == ["g/a/0"]
        assert all(isinstance(lease, Lease) and lease.replicas == replicas for lease in leases)
        assert sleepers.workers["g/a/0"].holds == 3  # not idle until the requests are sent
        for lease in leases:
            lease.release()
        assert sleepers.workers["g/a/0"].holds == 0
        assert discovery.state.written[-1] == {"g/a/0": AWAKE}
        assert {"g/a/0": WAKING} in discovery.state.written
    run_async(test)


def test_keeper_waits_for_a_standby_worker_loading_on_the_gpu():
    async def test() -> None:
        sleepers, runtime, discovery, _ = keeper({"a": True})
        loading = worker("new", phase="starting")
        discovery.workers = [worker("a"), loading]
        view = view_of(worker("a"), loading)
        await sleepers.sync(view)
        request = asyncio.create_task(sleepers.acquire("a", view.table.replicas("a"), 10))
        while "is loading" not in sleepers.workers["g/a/0"].waiting:
            await asyncio.sleep(0.01)
        assert runtime.did("wake") == []
        runtime.asleep["g/new/0"] = True  # ready, and put to sleep by apply
        discovery.workers = [worker("a"), worker("new")]
        await sleepers.sync(view_of(worker("a"), worker("new")))

        assert isinstance(await request, Lease)
        assert runtime.did("wake") == ["g/a/0"]
    run_async(test)


def test_keeper_marks_awake_neighbours_of_a_start_unknown_and_sends_them_nothing():
    async def test() -> None:
        sleepers, runtime, _, _ = keeper({"a": False})
        view = view_of(worker("a"))
        await observed(sleepers, view)
        assert sleepers.routable(view.table.replicas("a"))
        await sleepers.sync(view_of(worker("a"), worker("new", phase="starting")))
        unknown = sleepers.workers["g/a/0"].state
        routable = sleepers.routable(view.table.replicas("a"))
        runtime.asleep["g/a/0"] = True  # apply put it to sleep before the start
        await sleepers.sync(view_of(worker("a"), worker("new")))

        assert unknown == UNKNOWN and routable == []
        assert sleepers.workers["g/a/0"].state == ASLEEP
    run_async(test)


def test_keeper_answers_503_on_wake_timeout_and_gives_the_wake_up_up():
    async def test() -> None:
        sleepers, runtime, _, outstanding = keeper({"a": False, "b": True})
        view = view_of(worker("a"), worker("b"))
        await observed(sleepers, view)
        outstanding.begin("g/a/0")  # a stream on a

        answer = await sleepers.acquire("b", view.table.replicas("b"), 0.2)
        await asyncio.sleep(0)
        task = sleepers.workers["g/b/0"].wake
        assert task is not None
        await asyncio.wait_for(asyncio.shield(task), 5)  # no request waits: it gave up
        outstanding.end("g/a/0")

        assert isinstance(answer, GatewayError) and answer.code == "wake_timeout"
        assert ("Retry-After", "1") in answer.headers
        assert "answering requests: g/a/0" in answer.message
        assert runtime.did("sleep") == [] and runtime.did("wake") == []
    run_async(test)


def test_keeper_answers_503_when_the_wake_up_fails():
    async def test() -> None:
        sleepers, runtime, _, _ = keeper({"a": True})
        runtime.fail_wake = True
        view = view_of(worker("a"))
        await sleepers.sync(view)

        answer = await sleepers.acquire("a", view.table.replicas("a"), 5)

        assert isinstance(answer, GatewayError) and answer.code == "wake_failed"
        assert "answered 500" in answer.message
        assert sleepers.workers["g/a/0"].state == UNKNOWN  # asked again before anything else
    run_async(test)


def test_keeper_puts_idle_workers_to_sleep_past_timeout_and_beyond_the_slot():
    async def test() -> None:
        sleepers, runtime, _, _ = keeper({"a": False, "b": False, "c": False})
        clock = [0.0]
        sleepers.clock = lambda: clock[0]
        view = view_of(worker("a"), worker("b"), worker("c", gpus=(1,)), idle_timeout=60.0)
        await observed(sleepers, view)
        sleepers.workers["g/b/0"].last_used = -1.0  # b is the least recently used on GPU 0
        keeping = asyncio.create_task(sleepers.run())
        while "g/b/0" not in runtime.did("sleep"):
            await asyncio.sleep(0.01)
        clock[0] = 61.0  # past a's and c's idle timeout
        while len(runtime.did("sleep")) < 3:
            await asyncio.sleep(0.01)
        keeping.cancel()

        assert runtime.did("sleep") == ["g/b/0", "g/a/0", "g/c/0"]
        assert sleepers.metrics.of("b").sleeps == {"evicted": 1}
        assert sleepers.metrics.of("a").sleeps == {"idle": 1}
    run_async(test)


def test_keeper_counts_a_running_stop_mode_worker_in_the_slot():
    async def test() -> None:
        sleepers, runtime, _, _ = keeper({"a": True})
        view = view_of(worker("a"), worker("cold", mode="stop", asleep=0))
        await sleepers.sync(view)

        answer = await sleepers.acquire("a", view.table.replicas("a"), 0.2)

        assert isinstance(answer, GatewayError) and "standby: stop" in answer.message
        assert runtime.did("wake") == []
    run_async(test)


# -- end to end --------------------------------------------------------------------------------

# (a name with TOKEN in it looks like a secret to the file's checks: passed by reference)
STANDIN_ENV = {"STANDIN_VLLM_SLEEP_DELAY": "0.05", "STANDIN_VLLM_WAKE_DELAY": "0.05",
               "STANDIN_VLLM_WAKE_DELAY_LEVEL2": "0.1",
               "STANDIN_VLLM_TOKEN_DELAY": "${STANDIN_VLLM_TOKEN_DELAY}"}
TOKEN_DELAY = {"STANDIN_VLLM_TOKEN_DELAY": "0.01"}  # 300 tokens: a 3 s stream
WAKE_TIMEOUT = "30s"
LONG_IDLE = "10m"


def garden_models(*, idle_a: str = LONG_IDLE, extra: tuple[dict, ...] = ()) -> list[dict]:
    """a (level 1) and b (level 2): each fits in GPU 0's wake slot, never both."""
    return [model("a", standby={"mode": "sleep", "level": 1, "idle_timeout": idle_a}),
            model("b", standby={"mode": "sleep", "level": 2, "idle_timeout": LONG_IDLE}),
            *extra]


def configure(garden: Garden, gateway: Gateway | None = None, *, wake_timeout: str = WAKE_TIMEOUT,
              **models: object) -> None:
    """Write the garden file; with ``gateway``, wait until it has read the new version."""
    read = gateway.log().count("read the new version") if gateway else 0
    write_garden(garden, garden_models(**models), gateway={"wake_timeout": wake_timeout},
                 defaults={"env": STANDIN_ENV})
    if gateway is not None:
        assert wait_until(lambda: gateway.log().count("read the new version") > read), \
            gateway.log()


class StandbyGarden:
    """The garden of the tests below, its gateway, and what they need to see of the workers."""

    def __init__(self, garden: Garden, gateway: Gateway) -> None:
        self.garden = garden
        self.gateway = gateway

    def wid(self, name: str) -> str:
        return self.garden.worker_id(name)

    def port(self, name: str) -> int:
        return self.garden.record(self.wid(name))["spec"]["port"]

    def sleeping(self, name: str) -> bool | None:
        _, body = http_get(self.port(name), "/is_sleeping")
        return body.get("is_sleeping") if isinstance(body, dict) else None

    def worker_log(self, name: str) -> str:
        return Path(self.garden.record(self.wid(name))["log_path"]).read_text()

    def states(self) -> dict[str, dict]:
        """The gateway's standby.json: worker id -> its view."""
        path = self.garden.state / "gardens" / self.garden.name / "standby.json"
        try:
            return json.loads(path.read_text())["workers"]
        except (OSError, ValueError):
            return {}

    def state(self, name: str) -> str | None:
        return self.states().get(self.wid(name), {}).get("state")

    def chat(self, name: str, text: str = "hello world", max_tokens: int = 3) -> str:
        reply = self.gateway.client().chat.completions.create(
            model=name, messages=[{"role": "user", "content": text}], max_tokens=max_tokens)
        return reply.choices[0].message.content

    def awake_only(self, name: str) -> None:
        """Make ``name`` the awake one (a request for it puts the other to sleep)."""
        assert self.chat(name) == "hello world hello"
        assert wait_until(lambda: self.state(name) == AWAKE)

    def metric(self, name: str, **labels: str) -> float:
        return self.gateway.metric(f"gardenctl_gateway_{name}", **labels)


@pytest.fixture(scope="module")
def standby(tmp_path_factory):
    with garden_at(tmp_path_factory.mktemp("standby"), gpus=2,
                   extra_env=TOKEN_DELAY) as garden:
        configure(garden)
        run = garden.apply()
        assert run.code == 0, str(run)
        yield StandbyGarden(garden, Gateway(garden))


def content_chunks(chunks) -> int:
    """How many chunks of a chat stream carry a token."""
    return sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content)


def lines_with(text: str, needle: str) -> list[int]:
    """The indexes of the lines of ``text`` that contain ``needle``."""
    return [i for i, line in enumerate(text.splitlines()) if needle in line]


@e2e
def test_the_plan_books_both_asleep_and_one_wake_slot(standby):
    run = standby.garden.run("plan", "-o", "json")
    gpu = next(g for g in run.json()["gpus"] if g["standby_after"])
    growth = {s["worker"]: s["awake_bytes"] - s["asleep_bytes"] for s in gpu["standby_after"]}

    assert sorted(growth) == [standby.wid("a"), standby.wid("b")]
    assert gpu["wake_slot_bytes"] == max(growth.values())
    assert sum(growth.values()) > gpu["wake_slot_bytes"]  # never both awake at once


@e2e
def test_after_apply_both_sleep_and_the_gateway_says_so(standby):
    assert standby.sleeping("a") is True and standby.sleeping("b") is True
    assert wait_until(lambda: standby.state("a") == ASLEEP and standby.state("b") == ASLEEP), \
        standby.states()
    assert standby.states()[standby.wid("a")]["wakes"] == 0
    assert standby.metric("standby_awake_workers", model="a") == 0
    assert {m.id for m in standby.gateway.client().models.list().data} == {"a", "b"}


@e2e
def test_a_request_wakes_a_sleeping_model_and_concurrent_ones_share_the_wake_up(standby):
    answers: list[str] = []
    clients = [threading.Thread(target=lambda: answers.append(standby.chat("a")))
               for _ in range(4)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(30)

    assert answers == ["hello world hello"] * 4
    assert standby.sleeping("a") is False
    assert standby.worker_log("a").count("wake up the engine with tags: None") == 1
    assert standby.metric("wakeups_total", model="a") == 1
    assert standby.metric("wake_seconds_count", model="a") == 1
    assert standby.metric("standby_awake_workers", model="a") == 1
    assert wait_until(lambda: standby.states()[standby.wid("a")]["wakes"] == 1)
    view = standby.states()[standby.wid("a")]
    assert view["state"] == AWAKE and view["last_wake_s"] > 0 and view["last_wake"] > 0
    assert view["pid"] == standby.garden.pids()[standby.wid("a")]
    assert re.search(rf"a: woke {re.escape(standby.wid('a'))} in \d+\.\d\ds",
                     standby.gateway.log())


@e2e
def test_waking_b_first_puts_idle_a_to_sleep_and_level_2_reloads_the_weights(standby):
    standby.awake_only("a")
    evicted = standby.metric("sleeps_total", model="a", reason="evicted")

    answer = standby.chat("b", "one two three", max_tokens=3)

    assert answer == "one two three"  # not "<weights not loaded>": reload_weights was called
    assert standby.sleeping("a") is True and standby.sleeping("b") is False
    log = standby.gateway.log()
    slept = lines_with(log, f"put {standby.wid('a')} to sleep to make room for "
                            f"{standby.wid('b')}")
    woke = lines_with(log, f"woke {standby.wid('b')} in")
    assert slept and woke and slept[-1] < woke[-1], log
    assert f"put to sleep first: {standby.wid('a')}" in log.splitlines()[woke[-1]]
    worker = standby.worker_log("b")
    assert worker.rindex("wake up the engine") < worker.rindex("Reloading weights inplace...")
    assert standby.metric("sleeps_total", model="a", reason="evicted") == evicted + 1
    assert wait_until(lambda: standby.state("a") == ASLEEP and standby.state("b") == AWAKE)


@e2e
def test_a_model_streaming_is_never_put_to_sleep_the_other_waits_for_the_stream(standby):
    standby.awake_only("b")
    events: list[str] = []
    stream = standby.gateway.client().chat.completions.create(
        model="b", messages=[{"role": "user", "content": "s"}], max_tokens=300, stream=True)
    chunks = iter(stream)
    first = next(chunks)  # the stream runs

    def ask_a() -> None:
        answer = standby.chat("a")
        events.append(f"a answered: {answer}")

    waiting = threading.Thread(target=ask_a)
    waiting.start()
    blocked = wait_until(lambda: f"answering requests: {standby.wid('b')}"
                         in standby.gateway.log())
    tokens = content_chunks([first, *chunks])
    events.append("b's stream ended")
    waiting.join(30)

    assert blocked, standby.gateway.log()
    assert tokens == 300  # the stream was not cut
    assert events == ["b's stream ended", "a answered: hello world hello"]
    assert "Waiting for in-flight requests" not in standby.worker_log("b")  # asked when idle
    assert standby.sleeping("b") is True and standby.sleeping("a") is False


@e2e
def test_past_wake_timeout_the_request_gets_503_with_retry_after(standby):
    standby.awake_only("a")
    configure(standby.garden, standby.gateway, wake_timeout="1s")
    try:
        stream = standby.gateway.client().completions.create(
            model="a", prompt="forever", max_tokens=100000, stream=True)
        next(iter(stream))
        with pytest.raises(openai.InternalServerError) as caught:
            standby.chat("b")
        stream.close()
    finally:
        configure(standby.garden, standby.gateway)

    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.body["code"] == "wake_timeout"
    assert f"answering requests: {standby.wid('a')}" in caught.value.body["message"]
    assert standby.sleeping("b") is True  # nobody waits for it any more: not woken


@e2e
def test_idle_timeout_puts_a_woken_model_to_sleep_and_an_edit_applies_live(standby):
    standby.awake_only("a")
    idle = standby.metric("sleeps_total", model="a", reason="idle")
    configure(standby.garden, standby.gateway, idle_a="1s")
    try:
        slept = wait_until(lambda: standby.sleeping("a"), timeout=30)
    finally:
        configure(standby.garden, standby.gateway)

    assert slept, standby.gateway.log()
    assert f"put {standby.wid('a')} to sleep idle for 1s" in standby.gateway.log()
    assert wait_until(lambda: standby.state("a") == ASLEEP)
    assert standby.metric("sleeps_total", model="a", reason="idle") == idle + 1
    assert standby.metric("standby_awake_workers", model="a") == 0


@e2e
def test_a_garden_edit_applied_during_a_stream_leaves_the_stream_whole(standby):
    standby.awake_only("b")
    stream = standby.gateway.client().chat.completions.create(
        model="b", messages=[{"role": "user", "content": "s"}], max_tokens=1000, stream=True)
    chunks = iter(stream)
    first = next(chunks)
    counted: list[int] = []
    reader = threading.Thread(target=lambda: counted.append(content_chunks([first, *chunks])))
    reader.start()

    write_garden(standby.garden, garden_models(extra=(model("c"),)),
                 gateway={"wake_timeout": WAKE_TIMEOUT}, defaults={"env": STANDIN_ENV})
    run = standby.garden.apply()
    still_streaming = reader.is_alive()
    reader.join(60)

    assert run.code == 0, str(run)
    assert still_streaming  # the apply happened while the stream ran
    assert counted == [1000]
    assert wait_until(lambda: "c" in standby.gateway.models())
    reply = standby.gateway.client().completions.create(model="c", prompt="new", max_tokens=1)
    assert reply.choices[0].text == " new"


@e2e
def test_a_worker_killed_mid_stream_cuts_the_stream_and_serves_again_once_reapplied(standby):
    standby.awake_only("a")
    connection = http.client.HTTPConnection("127.0.0.1", standby.gateway.port, timeout=30)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(
        {"model": "a", "messages": [{"role": "user", "content": "k"}], "max_tokens": 100000,
         "stream": True}), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first = response.readline()
    old_pid = standby.garden.pids()[standby.wid("a")]
    os.kill(old_pid, signal.SIGKILL)
    try:
        rest, cut = response.read(), False
    except http.client.IncompleteRead as exc:  # the chunked body ends before its last chunk
        rest, cut = exc.partial, True
    connection.close()

    assert response.status == 200 and first.startswith(b"data: ")
    assert cut and b"[DONE]" not in rest  # no complete answer was passed off as one
    assert wait_until(lambda: "a" not in standby.gateway.models())
    run = standby.garden.apply()
    assert run.code == 0, str(run)
    assert wait_until(lambda: "a" in standby.gateway.models())
    assert standby.garden.pids()[standby.wid("a")] != old_pid
    assert standby.chat("a") == "hello world hello"
    assert "wake up the engine" in standby.worker_log("a")
