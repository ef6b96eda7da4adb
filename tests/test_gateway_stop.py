"""`standby: stop` behind the gateway: a model whose worker is stopped while idle and started
(a cold start, by `gardenctl watch`) when a request comes, through the garden's demand file.

First the gateway's decisions with fakes (tests/gateway_helpers.py: the runtime, the state
directory, discovery): what it writes to the demand file, when, and what it answers. Then end
to end: a real `gardenctl watch --gateway -o json` (tests/watch_helpers.py) on one declared GPU
that holds one of two stop-mode models at a time, stand-in workers, the real `openai` client.
Every wait is on an event (a state, a file, an answer, a watch event), never on a clock."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from e2e_helpers import free_port
from gateway_helpers import (
    Endpoint,
    Gateway,
    keeper,
    planned,
    run_async,
    stop_view,
    stopper,
    worker,
)
from watch_helpers import Watch, WatchedGarden, model, wait_until

from gardenctl import workflow
from gardenctl.gateway.discovery import PLAN_S, Discovery, routing_table
from gardenctl.gateway.errors import GatewayError
from gardenctl.gateway.sleepers import Lease
from gardenctl.gateway.standby import ASLEEP, AWAKE, SLEEPING, WAKING

A, B = "g/a/0", "g/b/0"


async def until(predicate) -> None:
    """Let the event loop run until ``predicate()`` holds (run_async bounds the whole test)."""
    while not predicate():
        await asyncio.sleep(0.01)


# -- what discovery gives the keeper ---------------------------------------------------------

def test_a_stopped_stop_mode_worker_is_in_the_routing_table_not_ready():
    stopped = routing_table("g", {"a"}, [], {}, (planned("a"),))
    running = routing_table("g", {"a"}, [stopper("a")], {}, (planned("a"),))
    loading = routing_table("g", {"a"}, [stopper("a", phase="starting")], {}, (planned("a"),))

    (replica,) = stopped.replicas("a")
    assert replica.standby and not replica.ready
    assert stopped.served_names() == ["a"]  # listed: a request has it started
    assert [(r.standby, r.ready) for r in running.replicas("a")] == [(True, True)]
    assert [r.ready for r in loading.replicas("a")] == [False]


def test_discovery_plans_the_stop_mode_workers_when_due_and_keeps_the_last_good_plan(
        monkeypatch, tmp_path):
    outcomes: list = [[SimpleNamespace(worker=planned("a")), SimpleNamespace(worker=None),
                       SimpleNamespace(worker=worker("always").spec)],
                      RuntimeError("no runtime"), RuntimeError("no runtime"),
                      [SimpleNamespace(worker=planned("b"))]]
    calls: list[bool] = []

    def plan_read_only(loaded, inventory, state, *, preflight=True):
        calls.append(preflight)
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return SimpleNamespace(plan=SimpleNamespace(steps=outcome))

    monkeypatch.setattr(workflow, "plan_read_only", plan_read_only)
    now = [0.0]
    discovery = Discovery("garden.yaml", None, str(tmp_path), environ={}, clock=lambda: now[0])
    discovery._inventory = object()  # type: ignore[assignment]
    stop_model = SimpleNamespace(standby=SimpleNamespace(mode="stop"))
    version = SimpleNamespace(models=lambda: [stop_model])
    problems: list[str] = []

    first = discovery._stop_planned(version, problems)  # type: ignore[arg-type]
    not_due = discovery._stop_planned(version, problems)  # type: ignore[arg-type]
    now[0] = PLAN_S
    failed = discovery._stop_planned(version, problems)  # type: ignore[arg-type]
    now[0] = 2 * PLAN_S
    failed_again = discovery._stop_planned(version, problems)  # type: ignore[arg-type]
    edited = SimpleNamespace(models=lambda: [stop_model])  # a new version: planned at once
    after_edit = discovery._stop_planned(edited, problems)  # type: ignore[arg-type]
    none = discovery._stop_planned(SimpleNamespace(models=list), problems)  # type: ignore[arg-type]

    assert [w.worker_id for w in first] == [A]
    assert not_due == failed == failed_again == first
    assert [w.worker_id for w in after_edit] == [B] and none == ()
    assert calls == [False] * 4  # read-only, without pre-flight, and only when due
    assert len(problems) == 1 and "the last plan stays" in problems[0]  # said once


# -- the keeper's decisions ------------------------------------------------------------------

def test_a_request_for_a_stopped_model_demands_it_and_is_sent_once_it_is_ready():
    async def test() -> None:
        sleepers, _, discovery, _ = keeper({})
        plan = (planned("a"),)
        view = stop_view(plan=plan)
        await sleepers.sync(view)
        stopped = discovery.state.written[-1]
        request = asyncio.create_task(sleepers.acquire("a", view.table.replicas("a"), 10))
        await until(lambda: A in discovery.state.demand)
        waking = discovery.state.written[-1]
        await sleepers.sync(stop_view(stopper("a", phase="starting"), plan=plan))
        await until(lambda: "starting" in sleepers.workers[A].waiting)
        loading = sleepers.routable(view.table.replicas("a"))
        await sleepers.sync(stop_view(stopper("a"), plan=plan))

        assert stopped == {A: "stopped"} and waking == {A: "waking"} and loading == []
        assert isinstance(await request, Lease)
        assert discovery.state.demands == [{A}]  # written once, and kept while it runs
        assert sleepers.workers[A].state == AWAKE and sleepers.workers[A].wakes == 1
        assert discovery.state.written[-1] == {A: "awake"}
        assert sleepers.metrics.of("a").wakeups == 1
    run_async(test)


def test_an_idle_running_stop_model_is_stopped_to_make_room_never_a_busy_one():
    async def test() -> None:
        sleepers, _, discovery, outstanding = keeper({})
        discovery.state.demand = {A: 1.0}  # a runs on demand; a and b fit one at a time
        plan = (planned("a"), planned("b"))
        a_runs = stop_view(stopper("a"), plan=plan)
        await sleepers.sync(a_runs)
        outstanding.begin(A)  # a request on a
        request = asyncio.create_task(sleepers.acquire("b", a_runs.table.replicas("b"), 10))
        await until(lambda: "answering requests: g/a/0" in sleepers.workers[B].waiting)
        untouched = list(discovery.state.demands)
        outstanding.end(A)
        await until(lambda: A not in discovery.state.demand)
        stopping = (sleepers.workers[A].state, discovery.state.written[-1][A])
        await sleepers.sync(stop_view(stopper("a", phase="stopping"), plan=plan))
        b_waits = B not in discovery.state.demand  # until a is observed stopped
        await sleepers.sync(stop_view(plan=plan))
        await until(lambda: B in discovery.state.demand)
        await sleepers.sync(stop_view(stopper("b"), plan=plan))

        assert untouched == [] and stopping == (SLEEPING, "stopping") and b_waits
        assert isinstance(await request, Lease)
        assert discovery.state.demands == [set(), {B}]
        assert sleepers.metrics.of("a").sleeps == {"evicted": 1}
        assert discovery.state.written[-1] == {A: "stopped", B: "awake"}
    run_async(test)


def test_the_least_recently_used_idle_stop_model_is_the_one_stopped():
    async def test() -> None:
        sleepers, _, discovery, _ = keeper({})
        discovery.state.demand = {A: 1.0, "g/c/0": 1.0}
        # the slot is big's 6 GiB: a and c (3 each) fill it; b (3) needs one of them gone
        plan = (planned("a", awake=3), planned("b", awake=3), planned("c", awake=3),
                planned("big", awake=6))
        running = stop_view(stopper("a", awake=3), stopper("c", awake=3), plan=plan)
        await sleepers.sync(running)
        sleepers.workers[A].last_used, sleepers.workers["g/c/0"].last_used = 5.0, 1.0
        request = asyncio.create_task(sleepers.acquire("b", running.table.replicas("b"), 10))
        await until(lambda: "g/c/0" not in discovery.state.demand)
        await sleepers.sync(stop_view(stopper("a", awake=3), plan=plan))  # c stopped
        await until(lambda: B in discovery.state.demand)
        request.cancel()

        assert discovery.state.demands == [{A}, {A, B}]
        assert sleepers.metrics.of("c").sleeps == {"evicted": 1}
        assert sleepers.workers[A].state == AWAKE
    run_async(test)


def test_without_a_watch_a_stopped_model_is_answered_503_at_once_and_nothing_is_demanded():
    async def test() -> None:
        sleepers, _, discovery, _ = keeper({})
        discovery.watched = False
        view = stop_view(plan=(planned("a"),))
        await sleepers.sync(view)

        answer = await sleepers.acquire("a", view.table.replicas("a"), 10)

        assert isinstance(answer, GatewayError) and answer.status == 503
        assert answer.code == "model_stopped"
        assert "no `gardenctl watch` of the garden runs" in answer.message
        assert "gardenctl watch --gateway" in answer.message
        assert discovery.state.demands == [] and sleepers.workers[A].wake is None
    run_async(test)


def test_without_a_watch_a_stop_model_still_running_is_served_again():
    async def test() -> None:
        sleepers, _, discovery, _ = keeper({})
        discovery.watched = False  # its demand was removed as idle; nothing stopped it
        view = stop_view(stopper("a"), plan=(planned("a"),))
        await sleepers.sync(view)
        before = sleepers.workers[A].state

        answer = await sleepers.acquire("a", view.table.replicas("a"), 10)

        assert before == SLEEPING and isinstance(answer, Lease)
        assert discovery.state.demands == [{A}] and sleepers.workers[A].state == AWAKE
    run_async(test)


def test_the_demand_is_withdrawn_when_nobody_waits_and_it_does_not_run_yet():
    async def test() -> None:
        sleepers, _, discovery, _ = keeper({})
        plan = (planned("a"),)
        view = stop_view(plan=plan)
        await sleepers.sync(view)

        answer = await sleepers.acquire("a", view.table.replicas("a"), 0.2)
        await until(lambda: not discovery.state.demand)

        assert isinstance(answer, GatewayError) and answer.code == "wake_timeout"
        assert ("Retry-After", "1") in answer.headers
        assert "is stopped (standby: stop) and could not be started" in answer.message
        assert "waiting for `gardenctl watch` to start it" in answer.message
        assert discovery.state.demands == [{A}, set()]  # nothing starts for nobody
        assert sleepers.workers[A].state == ASLEEP
    run_async(test)


def test_the_demand_stays_when_nobody_waits_but_it_is_starting():
    async def test() -> None:
        sleepers, _, discovery, _ = keeper({})
        plan = (planned("a"),)
        view = stop_view(plan=plan)
        await sleepers.sync(view)
        request = asyncio.create_task(sleepers.acquire("a", view.table.replicas("a"), 0.5))
        await until(lambda: A in discovery.state.demand)
        await sleepers.sync(stop_view(stopper("a", phase="starting"), plan=plan))

        answer = await request
        await sleepers.sync(stop_view(stopper("a", phase="starting"), plan=plan))
        still = (set(discovery.state.demand), sleepers.workers[A].state)
        await sleepers.sync(stop_view(stopper("a"), plan=plan))

        assert isinstance(answer, GatewayError) and "it is starting" in answer.message
        assert still == ({A}, WAKING)  # a cold start under way is not thrown away
        assert sleepers.workers[A].state == AWAKE  # then idle_timeout stops it
    run_async(test)


def test_a_model_removed_from_the_garden_while_it_starts_fails_the_request_and_its_demand():
    async def test() -> None:
        sleepers, _, discovery, _ = keeper({})
        view = stop_view(plan=(planned("a"),))
        await sleepers.sync(view)
        request = asyncio.create_task(sleepers.acquire("a", view.table.replicas("a"), 10))
        await until(lambda: A in discovery.state.demand)
        await sleepers.sync(stop_view(plan=()))  # the file no longer has a

        answer = await request

        assert isinstance(answer, GatewayError) and answer.code == "wake_failed"
        assert "is stopped (standby: stop) and starting it failed" in answer.message
        assert discovery.state.demand == {} and A not in sleepers.workers
    run_async(test)


def test_idle_timeout_has_a_running_stop_model_stopped_and_counts_it_once_stopped():
    async def test() -> None:
        sleepers, _, discovery, _ = keeper({})
        clock = [0.0]
        sleepers.clock = lambda: clock[0]
        discovery.state.demand = {A: 1.0}
        plan = (planned("a"),)
        await sleepers.sync(stop_view(stopper("a"), plan=plan, idle_timeout=60.0))
        keeping = asyncio.create_task(sleepers.run())
        clock[0] = 61.0
        await until(lambda: not discovery.state.demand)
        counted_early = dict(sleepers.metrics.of("a").sleeps)
        await sleepers.sync(stop_view(plan=plan, idle_timeout=60.0))
        keeping.cancel()

        assert counted_early == {} and sleepers.metrics.of("a").sleeps == {"idle": 1}
        assert sleepers.workers[A].state == ASLEEP
        assert discovery.state.written[-1] == {A: "stopped"}
        assert sleepers.metrics.standby_awake == {"a": 0}
    run_async(test)


def test_a_stop_model_starting_puts_awake_sleep_mode_neighbours_in_doubt():
    async def test() -> None:
        sleepers, runtime, discovery, _ = keeper({"s": False})
        discovery.state.demand = {A: 1.0}
        plan = (planned("a"),)
        await sleepers.sync(stop_view(worker("s"), plan=plan))
        awake = sleepers.workers["g/s/0"].state
        runtime.asleep["g/s/0"] = True  # watch put it to sleep before it started a
        await sleepers.sync(stop_view(worker("s"), stopper("a"), plan=plan))

        assert awake == AWAKE and sleepers.workers["g/s/0"].state == ASLEEP
        assert runtime.did("is_sleeping") == ["g/s/0", "g/s/0"]
    run_async(test)


# -- end to end: `gardenctl watch --gateway` ----------------------------------------------------

STARTUP = 60.0  # seconds allowed for what normally takes one or two (a busy machine)
LONG_IDLE = "10m"
SHORT_IDLE = "1s"


def stop_garden_text(garden: WatchedGarden, port: int) -> str:
    """a and b, `standby: stop`, on one GPU whose wake slot holds one of them: b is stopped
    when idle for a second, a not before ten minutes."""
    text = garden.text([model("a", standby={"mode": "stop", "idle_timeout": LONG_IDLE}),
                        model("b", standby={"mode": "stop", "idle_timeout": SHORT_IDLE})])
    return text + f"gateway: {json.dumps({'port': port, 'wake_timeout': '60s'})}\n"


def phases(garden: WatchedGarden) -> dict[str, str]:
    return {w["worker"]: w["phase"] for w in garden.status()["workers"]}


def standby_state(garden: WatchedGarden, worker_id: str) -> str | None:
    path = garden.state / "gardens" / garden.name / "standby.json"
    try:
        return json.loads(path.read_text())["workers"].get(worker_id, {}).get("state")
    except (OSError, ValueError, KeyError):
        return None


def chat(endpoint: Endpoint, name: str) -> str:
    reply = endpoint.client(timeout=STARTUP + 30).chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hello world"}], max_tokens=3)
    return reply.choices[0].message.content


def ok(watch: Watch, kind: str, worker_id: str, since: int = 0):
    return watch.wait_event(kind, worker_id, since=since, timeout=STARTUP,
                            where=lambda e: e.data.get("ok"))


@pytest.fixture
def stop_garden(tmp_path):
    garden = WatchedGarden(tmp_path / "garden", gpus=1)
    yield garden
    survivors = garden.tear_down()
    assert not survivors, "\n".join(survivors)


@pytest.mark.e2e
def test_watch_gateway_starts_stop_models_on_demand_one_at_a_time_and_stops_them_idle(
        stop_garden):
    garden = stop_garden
    a, b = garden.worker_id("a"), garden.worker_id("b")
    endpoint = Endpoint(free_port())
    garden.save_text(stop_garden_text(garden, endpoint.port))
    watch = garden.watch("--gateway")
    wait_until(lambda: endpoint.get("/health")[0] == 200, "the gateway answers", STARTUP)
    wait_until(lambda: garden.watch_status().get("last_applied")
               if (garden.state / "gardens" / garden.name / "watch.json").exists() else None,
               "the watch's first pass", STARTUP)

    # nothing runs until a request comes; both are listed, and shown stopped
    assert garden.worker_pids() == {}
    assert phases(garden) == {a: "stopped (standby)", b: "stopped (standby)"}
    assert {m.id for m in endpoint.client().models.list().data} == {"a", "b"}

    # a request for a: the gateway demands it, the watch starts it, the request is answered
    assert chat(endpoint, "a") == "hello world hello"
    ok(watch, "start", a)
    assert set(garden.worker_pids()) == {a}
    assert wait_until(lambda: standby_state(garden, a) == "awake", "a awake")
    assert endpoint.metric("gardenctl_gateway_wakeups_total", model="a") == 1

    # a request for b: a (idle) is stopped first, then b is started; answered
    mark = watch.mark()
    assert chat(endpoint, "b") == "hello world hello"
    stopped_a = ok(watch, "stop", a, since=mark)
    started_b = ok(watch, "start", b, since=mark)
    assert watch.index(stopped_a) < watch.index(started_b), watch.describe()
    assert endpoint.metric("gardenctl_gateway_sleeps_total", model="a", reason="evicted") == 1
    assert endpoint.metric("gardenctl_gateway_wakeups_total", model="b") == 1
    assert f"stopped first: {a}" in watch.stderr()

    # b, idle past its idle_timeout, is stopped again: nothing runs
    ok(watch, "stop", b, since=watch.index(started_b))
    wait_until(lambda: endpoint.metric("gardenctl_gateway_sleeps_total", model="b",
                                       reason="idle") == 1, "b's stop counted", STARTUP)
    assert wait_until(lambda: standby_state(garden, b) == "stopped", "b shown stopped")
    assert garden.worker_pids() == {}
    assert phases(garden) == {a: "stopped (standby)", b: "stopped (standby)"}
    assert json.loads((garden.state / "gardens" / garden.name / "demand.json").read_text()) \
        == {"workers": {}}

    # SIGTERM ends the watch and its gateway
    assert watch.stop() == 0, watch.describe()
    assert endpoint.get("/health")[0] is None
    assert garden.worker_pids() == {}


@pytest.mark.e2e
def test_a_gateway_without_a_watch_answers_503_at_once_for_a_stopped_model(stop_garden):
    garden = stop_garden
    port = free_port()
    garden.save_text(stop_garden_text(garden, port))
    gateway = Gateway(garden, port=port)
    try:
        status, headers, body = gateway.request("POST", "/v1/chat/completions", {
            "model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    finally:
        gateway.stop()

    error = json.loads(body)["error"]
    assert status == 503 and error["code"] == "model_stopped", body
    assert "no `gardenctl watch` of the garden runs to start it" in error["message"]
    assert "retry-after" not in headers
    assert not (garden.state / "gardens" / garden.name / "demand.json").exists()
    assert garden.worker_pids() == {}
