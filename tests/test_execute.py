"""The executor: order of stops and starts, one start per GPU at a time, failures told apart."""

from __future__ import annotations

import threading

from builders import garden_text, plan_for

from gardenctl import execute as ex
from gardenctl.runtime.fake import FakeRuntime


class Clock:
    """A clock that advances only when someone sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def update(self, worker_id, phase, detail, elapsed):
        with self.lock:
            self.events.append((worker_id, phase))


def run(plan, runtime, clock, environ=None, probe=None, progress=None):
    return ex.execute(plan, runtime, environ=environ or {}, probe=probe, progress=progress,
                      clock=clock, sleep=clock.sleep, poll_interval=0.5)


MODELS = """\
  - {name: a, model: org/a, max_model_len: 1024, env: {STANDIN_VLLM_READY_DELAY: '5'}}
  - {name: b, model: org/b, max_model_len: 1024, env: {STANDIN_VLLM_READY_DELAY: '5'}}
"""


def fake():
    clock = Clock()
    return FakeRuntime(node="node-a", clock=clock), clock


def test_workers_start_and_report_ready():
    runtime, clock = fake()
    report = run(plan_for(garden_text(MODELS)), runtime, clock)
    assert report.ok
    assert {r.outcome for r in report.results} == {ex.READY_OUTCOME}
    assert {w.phase for w in runtime.observe().workers} == {"ready"}


def test_workers_sharing_a_gpu_start_one_after_another():
    runtime, clock = fake()
    progress = Recorder()
    plan = plan_for(garden_text(MODELS))
    assert plan.actions[0].gpus == plan.actions[1].gpus  # both packed on one GPU
    run(plan, runtime, clock, progress=progress)
    phases = [e for e in progress.events if e[1] in ("spawning", "ready")]
    assert [p for _, p in phases] == ["spawning", "ready", "spawning", "ready"]


def test_stops_happen_before_starts():
    runtime, clock = fake()
    first = plan_for(garden_text(MODELS))
    run(first, runtime, clock)
    swapped = plan_for(garden_text(MODELS.replace("name: a", "name: c")), runtime.observe())
    order = []
    original_stop, original_spawn = runtime.stop, runtime.spawn
    runtime.stop = lambda *a, **k: (order.append("stop"), original_stop(*a, **k))[1]
    runtime.spawn = lambda *a, **k: (order.append("spawn"), original_spawn(*a, **k))[1]
    run(swapped, runtime, clock)
    assert order == ["stop", "spawn"]


def test_failed_start_is_reported_with_its_cause_and_others_still_start():
    runtime, clock = fake()
    models = MODELS.replace("{STANDIN_VLLM_READY_DELAY: '5'}}\n  - {name: b",
                            "{STANDIN_VLLM_READY_DELAY: '5', STANDIN_VLLM_FAIL: oom}}\n  - {name: b")
    report = run(plan_for(garden_text(models)), runtime, clock)
    failed = {r.worker_id: r for r in report.failed()}
    assert set(failed) == {"lab/a/0"}
    assert failed["lab/a/0"].outcome == ex.EXITED_BEFORE_READY
    assert failed["lab/a/0"].cause == "out_of_memory"
    assert "CUDA out of memory" in failed["lab/a/0"].message
    assert {w.worker_id: w.phase for w in runtime.observe().workers}["lab/b/0"] == "ready"


def test_start_timeout_is_told_apart_and_the_stuck_worker_is_stopped():
    runtime, clock = fake()
    models = "  - {name: a, model: org/a, max_model_len: 1024, start_timeout: 60, " \
             "env: {STANDIN_VLLM_FAIL: hang}}\n"
    report = run(plan_for(garden_text(models)), runtime, clock)
    (result,) = report.results
    assert result.outcome == ex.HEALTH_TIMEOUT and "60s" in result.message
    assert runtime.observe().workers == ()


def test_missing_secret_changes_nothing_for_that_worker():
    runtime, clock = fake()
    first = plan_for(garden_text(MODELS))
    run(first, runtime, clock)
    edited = MODELS.replace("env: {STANDIN", "env: {HF_TOKEN: '${HF_TOKEN}', STANDIN", 1)
    report = run(plan_for(garden_text(edited), runtime.observe()), runtime, clock, environ={})
    (result,) = report.results
    assert result.outcome == ex.MISSING_SECRET and "HF_TOKEN" in result.message
    assert "lab/a/0" not in runtime.stopped  # the running version was left alone


def test_secret_value_reaches_the_worker_environment_only():
    runtime, clock = fake()
    models = "  - {name: a, model: org/a, max_model_len: 1024, env: {HF_TOKEN: '${MY_TOKEN}'}}\n"
    plan = plan_for(garden_text(models))
    seen = {}
    original = runtime.spawn
    runtime.spawn = lambda worker, env, restarts=0: (seen.update(env), original(worker, env,
                                                                                restarts))[1]
    run(plan, runtime, clock, environ={"MY_TOKEN": "hf_secret"})
    assert seen["HF_TOKEN"] == "hf_secret"
    assert "hf_secret" not in repr(plan)


class Probe:
    def __init__(self, free: int, held: dict | None = None):
        self.free, self.held = free, held or {}

    def free_bytes(self, node, index):
        return self.free

    def pids_on(self, node, index):
        return self.held.get(index, set())


def test_start_is_refused_when_the_gpu_never_has_the_free_memory():
    runtime, clock = fake()
    report = run(plan_for(garden_text(MODELS)), runtime, clock, probe=Probe(free=1024))
    assert {r.outcome for r in report.results} == {ex.INSUFFICIENT_FREE}
    assert runtime.spawned == []


def test_stop_waits_for_gpu_memory_and_reports_when_it_is_not_released():
    runtime, clock = fake()
    first = plan_for(garden_text(MODELS))
    run(first, runtime, clock)
    pids = {w.pid for w in runtime.observe().workers}
    shrunk = plan_for(garden_text(MODELS.splitlines(keepends=True)[0]), runtime.observe())
    report = run(shrunk, runtime, clock, probe=Probe(free=10**12, held={0: pids}))
    (result,) = report.failed()
    assert result.outcome == ex.MEMORY_NOT_RELEASED


def test_crashed_worker_is_started_again_with_restart_count():
    runtime, clock = fake()
    run(plan_for(garden_text(MODELS)), runtime, clock)
    runtime.kill("lab/a/0")
    again = plan_for(garden_text(MODELS), runtime.observe())
    run(again, runtime, clock)
    seen = {w.worker_id: w for w in runtime.observe().workers}
    assert seen["lab/a/0"].phase == "ready" and seen["lab/a/0"].restarts == 1


def test_unrecorded_worker_with_matching_spec_is_adopted_not_restarted():
    runtime, clock = fake()
    plan = plan_for(garden_text(MODELS))
    for action in plan.actions:
        runtime.add_unrecorded(action.worker)
    again = plan_for(garden_text(MODELS), runtime.observe())
    assert {a.action for a in again.actions} == {"keep"}
    report = run(again, runtime, clock)
    assert {r.message for r in report.results} == {"adopted: record written"}
    assert runtime.spawned == []


def test_worker_still_loading_from_an_interrupted_run_is_awaited_before_its_neighbour():
    runtime, clock = fake()
    only_a = plan_for(garden_text(MODELS.splitlines(keepends=True)[0]))
    stop = threading.Event()

    class InterruptAfterSpawn:
        def update(self, worker_id, phase, detail, elapsed):
            if phase == "spawning":
                stop.set()  # e.g. Ctrl-C, or watch seeing the file change

    report = ex.execute(only_a, runtime, environ={}, progress=InterruptAfterSpawn(), clock=clock,
                        sleep=clock.sleep, stop_event=stop, wall=clock)
    assert report.interrupted
    assert [w.phase for w in runtime.observe().workers] == ["starting"]
    progress = Recorder()
    both = plan_for(garden_text(MODELS), runtime.observe())
    report = ex.execute(both, runtime, environ={}, progress=progress, clock=clock,
                        sleep=clock.sleep, wall=clock)
    assert report.ok
    order = [e for e in progress.events if e[1] in ("spawning", "ready")]
    assert order == [("lab/a/0", "ready"), ("lab/b/0", "spawning"), ("lab/b/0", "ready")]
