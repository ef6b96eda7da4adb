"""The watcher's decisions, pass by pass, on real files and the in-memory runtime."""

from __future__ import annotations

import io
import json

import pytest

from gardenctl.events import EventLog
from gardenctl.runtime.fake import FakeRuntime
from gardenctl.session import Session
from gardenctl.state import StateDir
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


@pytest.fixture
def setup(tmp_path):
    garden = tmp_path / "garden.yaml"
    garden.write_text(HEAD + A + B)
    runtime = FakeRuntime(node="node-a")
    session = Session(StateDir(tmp_path / "state").ensure(), "test", runtime=runtime)
    out = io.StringIO()
    clock = Clock()
    watcher = Watcher(session, WatchOptions(garden_path=str(garden)),
                      EventLog(out, json_lines=True, wall=clock), wall=clock)

    def events():
        return [json.loads(line) for line in out.getvalue().splitlines()]

    return garden, runtime, watcher, events, clock


def pids(runtime):
    return {w.worker_id: w.pid for w in runtime.observe().workers}


def test_first_pass_converges_and_reports_the_version(setup):
    garden, runtime, watcher, events, _ = setup
    watcher.pass_once("start")
    assert set(pids(runtime)) == {"lab/a/0", "lab/b/0"}
    kinds = [e["event"] for e in events()]
    assert kinds[:2] == ["accepted", "plan"] and kinds.count("start") == 2
    status = json.loads((watcher.session.state.root / "gardens/lab/watch.json").read_text())
    assert status["last_applied"]["version"] == status["last_attempted"]["version"]


def test_broken_file_changes_nothing_and_the_fix_converges(setup):
    garden, runtime, watcher, events, _ = setup
    watcher.pass_once("start")
    before = pids(runtime)
    garden.write_text(HEAD + A + "  - {name: b, model: x, max_model_len: [\n")
    watcher.pass_once("file changed")
    assert pids(runtime) == before
    invalid = [e for e in events() if e["event"] == "invalid"]
    assert invalid and invalid[0]["issues"][0]["line"] >= 6  # where the parser noticed
    garden.write_text(HEAD + A + B.replace("4096", "2048"))
    watcher.pass_once("file changed")
    after = pids(runtime)
    assert after["lab/a/0"] == before["lab/a/0"] and after["lab/b/0"] != before["lab/b/0"]


def test_a_version_that_does_not_fit_is_rejected(setup):
    garden, runtime, watcher, events, _ = setup
    watcher.pass_once("start")
    before = pids(runtime)
    garden.write_text(HEAD + A + "  - {name: huge, model: meta-llama/Llama-3.3-70B-Instruct}\n")
    watcher.pass_once("file changed")
    assert pids(runtime) == before  # b was not stopped for a version that cannot be applied
    rejected = [e for e in events() if e["event"] == "rejected"]
    assert any("does not fit the GPUs" in e["message"] for e in rejected)
    located = [e["issue"] for e in rejected if "issue" in e]
    assert located and located[0]["line"] == 6 and located[0]["path"] == "models[1]"


def test_emptying_the_garden_needs_allow_empty(setup):
    garden, runtime, watcher, events, _ = setup
    watcher.pass_once("start")
    garden.write_text(HEAD.replace("models:\n", "models: []\n"))
    watcher.pass_once("file changed")
    assert len(pids(runtime)) == 2
    assert any("--allow-empty" in e["message"] for e in events() if e["event"] == "rejected")


def test_renaming_the_garden_is_refused(setup):
    garden, runtime, watcher, events, _ = setup
    watcher.pass_once("start")
    garden.write_text((HEAD + A + B).replace("name: lab", "name: other"))
    watcher.pass_once("file changed")
    assert set(pids(runtime)) == {"lab/a/0", "lab/b/0"}
    assert any("name changed" in e["message"] for e in events() if e["event"] == "rejected")


def test_crashed_worker_restarts_at_once_then_backs_off(setup):
    garden, runtime, watcher, events, clock = setup
    watcher.pass_once("start")
    runtime.kill("lab/a/0")
    watcher.pass_once("worker exited")
    assert runtime.spawned.count("lab/a/0") == 2  # restarted at once
    runtime.kill("lab/a/0")
    clock.now += 1
    watcher.pass_once("worker exited")
    assert runtime.spawned.count("lab/a/0") == 2  # held: second crash in a row waits 10 s
    backoff = [e for e in events() if e["event"] == "backoff"]
    assert backoff and backoff[-1]["seconds"] == 10.0
    clock.now += 11
    watcher.pass_once("backoff expired")
    assert runtime.spawned.count("lab/a/0") == 3


def test_a_failing_worker_does_not_hold_back_the_others(setup):
    garden, runtime, watcher, events, clock = setup
    failing = A.replace("max_model_len: 2048}", "max_model_len: 2048, "
                        "env: {STANDIN_VLLM_FAIL: oom, STANDIN_VLLM_READY_DELAY: '0'}}")
    garden.write_text(HEAD + failing)
    watcher.pass_once("start")
    garden.write_text(HEAD + failing + B)
    clock.now += 1
    watcher.pass_once("file changed")
    seen = {w.worker_id: w.phase for w in runtime.observe().workers}
    assert seen["lab/b/0"] == "ready"
    assert [e["outcome"] for e in events() if e.get("worker") == "lab/a/0"
            and e["event"] == "start"][0] == "exited_before_ready"


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
    watcher.pass_once("start")
    assert runtime.spawned == []  # the only GPU is taken by another program
    gpus.write_text("nodes: [{name: node-a, gpus: [{name: L4, memory: 24GiB}]}]\n")
    watcher.pass_once("resync")  # same garden bytes, more room: accepted now
    assert runtime.spawned == ["lab/a/0"]
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    refusals = [e for e in events if e["event"] == "rejected" and "stays in force" in e["message"]]
    assert len(refusals) == 1 and any(e["event"] == "accepted" for e in events)


def test_a_version_that_cannot_be_planned_keeps_the_last_good_one_healing(setup):
    garden, runtime, watcher, events, clock = setup
    watcher.pass_once("start")
    garden.write_text(HEAD.replace("inventory: {nodes: [{name: node-a, gpus: [{name: L4, "
                                   "memory: 24GiB, count: 2}]}]}\n", "") + A + B)
    runtime.kill("lab/a/0")
    watcher.pass_once("worker exited")  # no inventory and no NVML here: cannot be planned
    assert runtime.spawned.count("lab/a/0") == 2  # still healed from the last good version
    assert any("cannot be planned" in e["message"] for e in events() if e["event"] == "rejected")


def test_a_new_version_of_a_failing_worker_starts_without_its_backoff(setup):
    garden, runtime, watcher, events, clock = setup
    watcher.pass_once("start")
    for _ in range(2):
        runtime.kill("lab/a/0")
        clock.now += 1
        watcher.pass_once("worker exited")
    spawned = runtime.spawned.count("lab/a/0")  # second crash in a row: held for 10 s
    garden.write_text(HEAD + A.replace("max_model_len: 2048", "max_model_len: 1024") + B)
    clock.now += 1
    watcher.pass_once("file changed")
    assert runtime.spawned.count("lab/a/0") == spawned + 1  # the fix starts at once


def test_a_bug_in_a_pass_does_not_stop_the_watcher(setup, monkeypatch):
    garden, runtime, watcher, events, _ = setup

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(watcher.session, "plan_loaded", broken)
    watcher.pass_once("start")  # must not raise
    assert any("internal error" in e["message"] for e in events() if e["event"] == "error")
