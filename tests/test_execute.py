"""The executor runs a plan's steps as their dependencies allow, deciding nothing: one start at
a time per GPU, stops first, failures told apart, rollbacks when (and only when) planned."""

from __future__ import annotations

import threading

from builders import garden_text, plan_for

from gardenctl import execute as ex
from gardenctl.reconcile import Circumstances
from gardenctl.runtime.fake import FakeRuntime
from gardenctl.vocab import Cause, Outcome, Phase, StepKind


class Clock:
    """A clock that advances only when someone sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
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


class RecordingRuntime(FakeRuntime):
    """The fake runtime, also writing down every spawn and stop in the order they happen."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(node="node-a", clock=clock)
        self.calls: list[tuple[str, str]] = []
        self.envs: dict[str, dict[str, str]] = {}

    def spawn(self, worker, env, launch):
        self.calls.append(("spawn", worker.worker_id))
        self.envs[worker.worker_id] = dict(env)
        super().spawn(worker, env, launch)

    def stop(self, worker_id, **options):
        self.calls.append(("stop", worker_id))
        return super().stop(worker_id, **options)


def run(plan, runtime, clock, environ=None, probe=None, progress=None, stop_event=None):
    return ex.execute(plan, runtime, environ=environ or {}, probe=probe, progress=progress,
                      clock=clock, sleep=clock.sleep, poll_interval=0.5, wall=clock,
                      stop_event=stop_event)


MODELS = """\
  - {name: a, model: org/a, max_model_len: 1024, env: {STANDIN_VLLM_READY_DELAY: '5'}}
  - {name: b, model: org/b, max_model_len: 1024, env: {STANDIN_VLLM_READY_DELAY: '5'}}
"""


def fake():
    clock = Clock()
    return RecordingRuntime(clock), clock


def phases(runtime):
    return {w.worker_id: w.phase for w in runtime.observe(confirm_health=False).workers}


def test_workers_start_and_report_ready():
    runtime, clock = fake()
    report = run(plan_for(garden_text(MODELS)), runtime, clock)
    assert report.ok
    assert {r.outcome for r in report.results} == {Outcome.READY}
    assert set(phases(runtime).values()) == {Phase.READY}


def test_workers_sharing_a_gpu_start_one_after_another():
    runtime, clock = fake()
    progress = Recorder()
    plan = plan_for(garden_text(MODELS))
    assert plan.steps[0].gpus == plan.steps[1].gpus  # both packed on one GPU
    run(plan, runtime, clock, progress=progress)
    order = [e for e in progress.events if e[1] in ("spawning", "ready")]
    assert [p for _, p in order] == ["spawning", "ready", "spawning", "ready"]


def test_stops_happen_before_starts():
    runtime, clock = fake()
    run(plan_for(garden_text(MODELS)), runtime, clock)
    runtime.calls.clear()
    swapped = plan_for(garden_text(MODELS.replace("name: a", "name: c")), runtime.observe())
    run(swapped, runtime, clock)
    assert runtime.calls == [("stop", "lab/a/0"), ("spawn", "lab/c/0")]


def test_failed_start_is_reported_with_its_cause_and_others_still_start():
    runtime, clock = fake()
    models = MODELS.replace("{STANDIN_VLLM_READY_DELAY: '5'}}\n  - {name: b",
                            "{STANDIN_VLLM_READY_DELAY: '5', STANDIN_VLLM_FAIL: oom}}\n"
                            "  - {name: b")
    report = run(plan_for(garden_text(models)), runtime, clock)
    failed = {r.worker_id: r for r in report.failed()}
    assert set(failed) == {"lab/a/0"}
    assert (failed["lab/a/0"].outcome, failed["lab/a/0"].cause) == (
        Outcome.EXITED_BEFORE_READY, Cause.OUT_OF_MEMORY)
    assert "CUDA out of memory" in failed["lab/a/0"].message
    assert phases(runtime) == {"lab/a/0": Phase.FAILED, "lab/b/0": Phase.READY}


def test_start_timeout_is_told_apart_and_the_stuck_worker_is_stopped_but_still_shown():
    runtime, clock = fake()
    models = "  - {name: a, model: org/a, max_model_len: 1024, start_timeout: 60, " \
             "env: {STANDIN_VLLM_FAIL: hang}}\n"
    report = run(plan_for(garden_text(models)), runtime, clock)
    (result,) = report.results
    assert result.outcome == Outcome.HEALTH_TIMEOUT and "60s" in result.message
    (seen,) = runtime.observe().workers
    assert (seen.phase, seen.cause, seen.pids) == (Phase.FAILED, Cause.START_TIMEOUT, ())


def test_a_missing_secret_changes_nothing_for_that_worker():
    runtime, clock = fake()
    run(plan_for(garden_text(MODELS)), runtime, clock)
    runtime.calls.clear()
    edited = MODELS.replace("env: {STANDIN", "env: {HF_TOKEN: '${HF_TOKEN}', STANDIN", 1)
    plan = plan_for(garden_text(edited), runtime.observe(),
                    world=Circumstances(env_names=frozenset()))
    report = run(plan, runtime, clock, environ={})
    (result,) = report.results
    assert (result.kind, result.outcome) == (StepKind.WAIT, Outcome.HELD)
    assert "HF_TOKEN" in result.message and runtime.calls == []


def test_a_secret_the_plan_could_not_check_is_still_never_spawned_without():
    runtime, clock = fake()
    models = "  - {name: a, model: org/a, max_model_len: 1024, env: {HF_TOKEN: '${MY_TOKEN}'}}\n"
    report = run(plan_for(garden_text(models)), runtime, clock, environ={})
    (result,) = report.results
    assert result.outcome == Outcome.MISSING_SECRET and runtime.calls == []


def test_secret_value_reaches_the_worker_environment_only():
    runtime, clock = fake()
    models = "  - {name: a, model: org/a, max_model_len: 1024, env: {HF_TOKEN: '${MY_TOKEN}'}}\n"
    plan = plan_for(garden_text(models))
    run(plan, runtime, clock, environ={"MY_TOKEN": "hf_secret"})
    assert runtime.envs["lab/a/0"]["HF_TOKEN"] == "hf_secret"
    assert "hf_secret" not in repr(plan)


class Probe:
    def __init__(self, free: int, held: dict | None = None):
        self.free, self.held = free, held or {}

    def free_bytes(self, node, index):
        return self.free

    def pids_on(self, node, index):
        return self.held.get(index, set())


def test_start_is_refused_when_the_gpu_never_has_the_free_memory_and_it_is_recorded():
    runtime, clock = fake()
    report = run(plan_for(garden_text(MODELS)), runtime, clock, probe=Probe(free=1024))
    assert {r.outcome for r in report.results} == {Outcome.INSUFFICIENT_FREE}
    assert runtime.spawned == []
    assert set(phases(runtime).values()) == {Phase.FAILED}  # shown, and counted by the backoff


def test_stop_waits_for_gpu_memory_and_reports_when_it_is_not_released():
    runtime, clock = fake()
    run(plan_for(garden_text(MODELS)), runtime, clock)
    pids = {w.pid for w in runtime.observe().workers}
    shrunk = plan_for(garden_text(MODELS.splitlines(keepends=True)[0]), runtime.observe())
    report = run(shrunk, runtime, clock, probe=Probe(free=10**12, held={0: pids}))
    (result,) = report.failed()
    assert result.outcome == Outcome.MEMORY_NOT_RELEASED


def test_crashed_worker_is_restarted_with_its_restart_count():
    runtime, clock = fake()
    run(plan_for(garden_text(MODELS)), runtime, clock)
    runtime.kill("lab/a/0")
    again = plan_for(garden_text(MODELS), runtime.observe())
    assert {s.worker_id: s.kind for s in again.steps}["lab/a/0"] == StepKind.RESTART
    run(again, runtime, clock)
    seen = {w.worker_id: w for w in runtime.observe().workers}
    assert (seen["lab/a/0"].phase, seen["lab/a/0"].restarts) == (Phase.READY, 1)
    assert seen["lab/a/0"].last_error == "killed by signal 9"


def test_unrecorded_worker_with_matching_spec_is_adopted_not_restarted():
    runtime, clock = fake()
    plan = plan_for(garden_text(MODELS))
    for step in plan.steps:
        runtime.add_unrecorded(step.worker)
    again = plan_for(garden_text(MODELS), runtime.observe())
    assert {s.kind for s in again.steps} == {StepKind.ADOPT}
    report = run(again, runtime, clock)
    assert {r.message for r in report.results} == {"adopted: record written"}
    assert runtime.spawned == []
    assert set(phases(runtime).values()) == {Phase.READY}


def test_worker_still_loading_from_an_interrupted_run_is_awaited_before_its_neighbour():
    runtime, clock = fake()
    only_a = plan_for(garden_text(MODELS.splitlines(keepends=True)[0]))
    stop = threading.Event()

    class InterruptAfterSpawn:
        def update(self, worker_id, phase, detail, elapsed):
            if phase == "spawning":
                stop.set()  # e.g. Ctrl-C

    report = run(only_a, runtime, clock, progress=InterruptAfterSpawn(), stop_event=stop)
    assert report.interrupted
    assert list(phases(runtime).values()) == [Phase.STARTING]
    progress = Recorder()
    both = plan_for(garden_text(MODELS), runtime.observe())
    report = run(both, runtime, clock, progress=progress)
    assert report.ok
    order = [e for e in progress.events if e[1] in ("spawning", "ready")]
    assert order == [("lab/a/0", "ready"), ("lab/b/0", "spawning"), ("lab/b/0", "ready")]


# -- rollouts --------------------------------------------------------------------------------

TWO_REPLICAS = "  - {name: m, model: org/m, max_model_len: 1024, replicas: 2, " \
               "env: {STANDIN_VLLM_READY_DELAY: '5'}}\n"


def test_a_good_edit_replaces_replicas_one_after_the_other_with_no_rollback():
    runtime, clock = fake()
    run(plan_for(garden_text(TWO_REPLICAS)), runtime, clock)
    runtime.calls.clear()
    edited = plan_for(garden_text(TWO_REPLICAS.replace("1024", "2048")), runtime.observe())
    report = run(edited, runtime, clock)
    assert report.ok and {r.kind for r in report.results} == {StepKind.REPLACE}
    assert runtime.calls == [("stop", "lab/m/0"), ("spawn", "lab/m/0"),
                             ("stop", "lab/m/1"), ("spawn", "lab/m/1")]


def test_a_bad_edit_is_rolled_back_on_the_first_replica_and_never_reaches_the_second():
    runtime, clock = fake()
    run(plan_for(garden_text(TWO_REPLICAS)), runtime, clock)
    before = {w.worker_id: w.spec_hash for w in runtime.observe().workers}
    runtime.calls.clear()
    bad = TWO_REPLICAS.replace("STANDIN_VLLM_READY_DELAY: '5'",
                               "STANDIN_VLLM_READY_DELAY: '5', STANDIN_VLLM_FAIL: oom")
    report = run(plan_for(garden_text(bad), runtime.observe()), runtime, clock)

    results = {(r.kind, r.worker_id): r for r in report.results}
    assert results[(StepKind.REPLACE, "lab/m/0")].outcome == Outcome.EXITED_BEFORE_READY
    assert results[(StepKind.ROLLBACK, "lab/m/0")].outcome == Outcome.READY
    assert results[(StepKind.REPLACE, "lab/m/1")].outcome == Outcome.SKIPPED
    assert (StepKind.ROLLBACK, "lab/m/1") not in results  # not needed: never replaced
    assert ("stop", "lab/m/1") not in runtime.calls  # replica 1 was never touched
    seen = {w.worker_id: w for w in runtime.observe().workers}
    assert {w: s.spec_hash for w, s in seen.items()} == before  # the model is as it was
    assert {s.phase for s in seen.values()} == {Phase.READY}
    rejected = seen["lab/m/0"].rejected
    assert rejected is not None and "CUDA out of memory" in rejected.reason


# -- watch: issue what may begin now ---------------------------------------------------------

def test_issue_begins_only_steps_that_wait_for_nothing_and_does_not_wait_for_loads():
    runtime, clock = fake()
    executor = ex.Executor(runtime, environ={}, clock=clock, sleep=clock.sleep, wall=clock)
    results = []
    done = threading.Event()

    def heard(result):
        results.append(result)
        done.set()

    issued = executor.issue(plan_for(garden_text(MODELS)), heard)
    assert [s.worker_id for s in issued] == ["lab/a/0"]  # b waits for a on the same GPU
    assert done.wait(5)
    executor.join(5)
    assert [(r.worker_id, r.outcome) for r in results] == [("lab/a/0", Outcome.SPAWNED)]
    assert phases(runtime) == {"lab/a/0": Phase.STARTING}  # still loading: nobody waited
    assert executor.in_flight() == frozenset()
