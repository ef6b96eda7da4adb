"""The watcher's decisions, pass by pass, on real files and the in-memory runtime.

A pass issues what may begin now and returns: `settle` runs passes (waiting for the steps
each issued to end) until nothing is left to begin, as the watcher's triggers would.
"""

from __future__ import annotations

import io
import json

import pytest

from gardenctl.events import EventLog
from gardenctl.runtime.fake import FakeRuntime
from gardenctl.session import Session
from gardenctl.state import StateDir
from gardenctl.vocab import Phase
from gardenctl.watch import Watcher, WatchOptions

HEAD = """\
name: lab
defaults: {env: {STANDIN_VLLM_READY_DELAY: "0"}}
inventory: {nodes: [{name: node-a, gpus: [{name: L4, memory: 24GiB, count: 2}]}]}
models:
"""
A = "  - {name: a, model: Qwen/Qwen3-0.6B, max_model_len: 2048}\n"
B = "  - {name: b, model: Qwen/Qwen2.5-1.5B-Instruct, max_model_len: 4096}\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settle(watcher: Watcher, reason: str, passes: int = 8) -> None:
    """Passes until one begins nothing (each pass's steps are waited for, as their ends would
    trigger the next pass)."""
    for _ in range(passes):
        watcher.pass_once(reason)
        if not watcher.executors:
            return
        for executor in watcher.executors:
            executor.join(10)
        plan = watcher.last_plan
        if plan is None or not any(s.changes or s.loading for s in plan.steps):
            return
        reason = "step ended"


@pytest.fixture
def setup(tmp_path):
    garden = tmp_path / "garden.yaml"
    garden.write_text(HEAD + A + B)
    clock = Clock()
    runtime = FakeRuntime(node="node-a", clock=clock)
    session = Session(StateDir(tmp_path / "state").ensure(), "test", runtime=runtime, clock=clock)
    out = io.StringIO()
    watcher = Watcher(session, WatchOptions(garden_path=str(garden)),
                      EventLog(out, json_lines=True, wall=clock), wall=clock)

    def events():
        return [json.loads(line) for line in out.getvalue().splitlines()]

    return garden, runtime, watcher, events, clock


def pids(runtime):
    return {w.worker_id: w.pid for w in runtime.observe(confirm_health=False).workers
            if w.running}


def test_first_passes_converge_and_report_the_version(setup):
    _garden, runtime, watcher, events, _clock = setup
    settle(watcher, "start")
    assert set(pids(runtime)) == {"lab/a/0", "lab/b/0"}
    kinds = [e["event"] for e in events()]
    assert kinds[:2] == ["accepted", "starting"] and kinds.count("start") == 2
    assert watcher.last_plan is not None and watcher.last_plan.converged
    status = json.loads((watcher.session.state.root / "gardens/lab/watch.json").read_text())
    assert status["last_applied"]["version"] == status["last_attempted"]["version"]


def test_a_pass_never_waits_for_a_worker_to_load(setup):
    garden, runtime, watcher, _events, _clock = setup
    garden.write_text(HEAD.replace('"0"', '"600"') + A)  # ten minutes of loading
    settle(watcher, "start")  # the spawn, then the pass its end triggers
    assert [w.phase for w in runtime.observe(confirm_health=False).workers] == [Phase.STARTING]
    assert watcher.loading == {"lab/a/0": pytest.approx(1000.0 + 900)}  # its start timeout


def test_broken_file_changes_nothing_and_the_fix_converges(setup):
    garden, runtime, watcher, events, _clock = setup
    settle(watcher, "start")
    before = pids(runtime)
    garden.write_text(HEAD + A + "  - {name: b, model: x, max_model_len: [\n")
    settle(watcher, "file changed")
    assert pids(runtime) == before
    invalid = [e for e in events() if e["event"] == "invalid"]
    assert invalid and invalid[0]["issues"][0]["line"] >= 6  # where the parser noticed
    garden.write_text(HEAD + A + B.replace("4096", "2048"))
    settle(watcher, "file changed")
    after = pids(runtime)
    assert after["lab/a/0"] == before["lab/a/0"] and after["lab/b/0"] != before["lab/b/0"]


def test_a_version_saved_during_a_burst_waits_for_the_file_to_be_quiet(setup):
    garden, runtime, watcher, events, _clock = setup
    settle(watcher, "start")
    before = pids(runtime)
    garden.write_text(HEAD + A + B.replace("4096", "2048"))
    watcher.file_quiet.changed()  # as the file-watching thread reports a save
    # any pass while saves may still be coming (a step ended, a worker died) keeps the
    # version in force: it would otherwise start a worker of a version about to change again
    settle(watcher, "step ended")
    assert pids(runtime) == before
    assert not [e for e in events() if e["event"] == "accepted"][1:]
    watcher.file_quiet.window = 0.0  # the quiet has lasted the window
    while not watcher.triggers.empty():  # the ends of the steps above, already acted on
        watcher.triggers.get_nowait()
    assert watcher._wait_for_trigger() == "file changed"
    settle(watcher, "file changed")
    after = pids(runtime)
    assert after["lab/a/0"] == before["lab/a/0"] and after["lab/b/0"] != before["lab/b/0"]
    assert watcher.file_quiet.remaining() is None  # one pass per burst


def test_a_version_that_does_not_fit_is_rejected(setup):
    garden, runtime, watcher, events, _clock = setup
    settle(watcher, "start")
    before = pids(runtime)
    garden.write_text(HEAD + A + "  - {name: huge, model: meta-llama/Llama-3.3-70B-Instruct}\n")
    settle(watcher, "file changed")
    assert pids(runtime) == before  # b was not stopped for a version that cannot be applied
    rejected = [e for e in events() if e["event"] == "rejected"]
    assert any("does not fit the GPUs" in e["message"] for e in rejected)
    located = [e["issue"] for e in rejected if "issue" in e]
    assert located and located[0]["line"] == 6 and located[0]["path"] == "models[1]"


def test_emptying_the_garden_needs_allow_empty(setup):
    garden, runtime, watcher, events, _clock = setup
    settle(watcher, "start")
    garden.write_text(HEAD.replace("models:\n", "models: []\n"))
    settle(watcher, "file changed")
    assert len(pids(runtime)) == 2
    assert any("--allow-empty" in e["message"] for e in events() if e["event"] == "rejected")


def test_renaming_the_garden_is_refused(setup):
    garden, runtime, watcher, events, _clock = setup
    settle(watcher, "start")
    garden.write_text((HEAD + A + B).replace("name: lab", "name: other"))
    settle(watcher, "file changed")
    assert set(pids(runtime)) == {"lab/a/0", "lab/b/0"}
    assert any("name changed" in e["message"] for e in events() if e["event"] == "rejected")


def test_crashed_worker_restarts_at_once_then_backs_off_and_says_until_when(setup):
    _garden, runtime, watcher, events, clock = setup
    settle(watcher, "start")
    runtime.kill("lab/a/0")
    settle(watcher, "worker exited")
    assert runtime.spawned.count("lab/a/0") == 2  # restarted at once
    runtime.kill("lab/a/0")
    clock.now += 1
    settle(watcher, "worker exited")
    assert runtime.spawned.count("lab/a/0") == 2  # held: second crash in a row waits 10 s
    backoff = [e for e in events() if e["event"] == "backoff"]
    assert backoff and backoff[-1]["seconds"] == 10.0
    assert backoff[-1]["until"] == "1970-01-01T00:16:51.000Z"  # exited at 1001, + 10 s
    assert ("backoff expired" in [why for _, why in watcher.timers])
    clock.now += 9.5
    settle(watcher, "resync")
    assert runtime.spawned.count("lab/a/0") == 2  # what the message said: not before 1011
    clock.now += 0.5
    settle(watcher, "backoff expired")
    assert runtime.spawned.count("lab/a/0") == 3


def test_a_failing_worker_does_not_hold_back_the_others(setup):
    garden, runtime, watcher, _events, clock = setup
    failing = A.replace("max_model_len: 2048}", "max_model_len: 2048, "
                        "env: {STANDIN_VLLM_FAIL: oom, STANDIN_VLLM_READY_DELAY: '0'}}")
    garden.write_text(HEAD + failing)
    settle(watcher, "start")
    garden.write_text(HEAD + failing + B)
    clock.now += 1
    settle(watcher, "file changed")
    seen = {w.worker_id: w for w in runtime.observe().workers}
    assert seen["lab/b/0"].phase == Phase.READY
    assert seen["lab/a/0"].phase == Phase.FAILED and seen["lab/a/0"].cause == "out_of_memory"


def test_a_version_refused_for_lack_of_room_is_retried_when_room_appears(tmp_path):
    garden = tmp_path / "garden.yaml"
    gpus = tmp_path / "gpus.yaml"
    gpus.write_text("nodes: [{name: node-a, gpus: [{name: L4, memory: 24GiB, used: 20GiB}]}]\n")
    garden.write_text(HEAD.replace("inventory: {nodes: [{name: node-a, gpus: [{name: L4, "
                                   "memory: 24GiB, count: 2}]}]}\n", "") + A)
    runtime = FakeRuntime(node="node-a")
    session = Session(StateDir(tmp_path / "state").ensure(), "test", runtime=runtime)
    out = io.StringIO()
    watcher = Watcher(session, WatchOptions(garden_path=str(garden), inventory_path=str(gpus)),
                      EventLog(out, json_lines=True))
    settle(watcher, "start")
    assert runtime.spawned == []  # the only GPU is taken by another program
    gpus.write_text("nodes: [{name: node-a, gpus: [{name: L4, memory: 24GiB}]}]\n")
    settle(watcher, "resync")  # same garden bytes, more room: accepted now
    assert runtime.spawned == ["lab/a/0"]
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    refusals = [e for e in events if e["event"] == "rejected" and "stays in force" in e["message"]]
    assert len(refusals) == 1 and any(e["event"] == "accepted" for e in events)


def test_a_version_that_cannot_be_planned_keeps_the_last_good_one_healing(setup):
    garden, runtime, watcher, events, _clock = setup
    settle(watcher, "start")
    garden.write_text(HEAD.replace("inventory: {nodes: [{name: node-a, gpus: [{name: L4, "
                                   "memory: 24GiB, count: 2}]}]}\n", "") + A + B)
    runtime.kill("lab/a/0")
    settle(watcher, "worker exited")  # no inventory and no NVML here: cannot be planned
    assert runtime.spawned.count("lab/a/0") == 2  # still healed from the last good version
    assert any("cannot be planned" in e["message"] for e in events() if e["event"] == "rejected")


def test_a_new_version_of_a_failing_worker_starts_without_its_backoff(setup):
    garden, runtime, watcher, _events, clock = setup
    settle(watcher, "start")
    for _ in range(2):
        runtime.kill("lab/a/0")
        clock.now += 1
        settle(watcher, "worker exited")
    spawned = runtime.spawned.count("lab/a/0")  # second crash in a row: held for 10 s
    garden.write_text(HEAD + A.replace("max_model_len: 2048", "max_model_len: 1024") + B)
    clock.now += 1
    settle(watcher, "file changed")
    assert runtime.spawned.count("lab/a/0") == spawned + 1  # the fix starts at once


def test_a_bad_edit_is_rolled_back_and_the_model_keeps_serving(setup):
    garden, runtime, watcher, events, _clock = setup
    two = A.replace("2048}", "2048, replicas: 2, spread_replicas: true}")
    garden.write_text(HEAD + two)
    settle(watcher, "start")
    before = pids(runtime)
    bad = two.replace("replicas: 2", "replicas: 2, env: {STANDIN_VLLM_FAIL: oom}")
    garden.write_text(HEAD + bad)
    settle(watcher, "file changed")
    seen = {w.worker_id: w for w in runtime.observe().workers}
    assert {w: s.phase for w, s in seen.items()} == {"lab/a/0": Phase.READY,
                                                     "lab/a/1": Phase.READY}
    assert pids(runtime)["lab/a/1"] == before["lab/a/1"]  # never touched
    assert seen["lab/a/0"].rejected is not None
    assert any(e["event"] == "rollback" and e["ok"] for e in events())
    waits = [e for e in events() if e["event"] == "waiting" and e.get("worker") == "lab/a/1"]
    assert waits and waits[0]["message"].startswith("rollout stopped")
    spawned = len(runtime.spawned)
    settle(watcher, "resync")
    assert len(runtime.spawned) == spawned  # the rejected version is not tried again
    # both replicas wait (a stopped rollout), and both are still probed for liveness
    assert set(watcher.prober.targets) == {"lab/a/0", "lab/a/1"}


def test_an_unhealthy_worker_is_restarted_by_the_next_pass(setup):
    _garden, runtime, watcher, _events, _clock = setup
    settle(watcher, "start")
    before = pids(runtime)
    runtime.mark_unhealthy("lab/a/0", "/health answered 503 (3 probes in a row)")
    settle(watcher, "worker unhealthy")
    after = {w.worker_id: w for w in runtime.observe().workers}
    assert after["lab/a/0"].phase == Phase.READY and after["lab/a/0"].pid != before["lab/a/0"]
    assert after["lab/a/0"].restarts == 1
    assert after["lab/a/0"].last_error.startswith("unhealthy: /health answered 503")
    assert after["lab/b/0"].pid == before["lab/b/0"]


def test_a_bug_in_a_pass_does_not_stop_the_watcher(setup, monkeypatch):
    _garden, _runtime, watcher, events, _clock = setup

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(watcher.session, "plan_loaded", broken)
    watcher.pass_once("start")  # must not raise
    assert any("internal error" in e["message"] for e in events() if e["event"] == "error")


def test_a_probe_that_raises_counts_as_a_failed_probe_and_probing_goes_on(setup, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    _garden, runtime, watcher, events, _clock = setup
    settle(watcher, "start")

    def broken(worker_id):
        raise OSError("too many open files")

    monkeypatch.setattr(runtime, "probe_health", broken)
    with ThreadPoolExecutor(max_workers=2) as pool:
        watcher.prober._probe_due(pool)
    probes = [e for e in events() if e["event"] == "probe"]
    assert {e["worker"] for e in probes} == {"lab/a/0", "lab/b/0"}
    assert all("the probe failed: OSError: too many open files" in e["message"] for e in probes)
