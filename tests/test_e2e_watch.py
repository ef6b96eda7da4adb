"""`gardenctl watch` end to end: the real command on a real garden file, stand-in vLLM workers.

Each test runs `python -m gardenctl watch -o json` as a child process on a garden in tmp_path
(tests/watch_helpers.py): simulated GPUs of one node, a private state directory, free ports.
What a user notices is asserted: which worker processes (pids) run with which flags, the event
lines, `gardenctl status -o json` and the watch status file. Every test ends by stopping the
watcher with SIGTERM (exit 0, "stopped", the workers keep running: the file owns them, not the
watcher); the fixture then runs `gardenctl down --yes` and checks with psutil that no process of
the state directory survives.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time

import psutil
import pytest
from watch_helpers import MODELS_LINE, Watch, WatchedGarden, model, wait_until

pytestmark = pytest.mark.e2e

STARTUP = 30.0  # seconds allowed for the first pass (process start-ups on a busy machine)
REACTION = 20.0  # seconds allowed for a reaction that normally takes about one
NO_START_WINDOW = 5.0  # seconds a held worker is watched for an early restart


@pytest.fixture
def garden(tmp_path):
    garden = WatchedGarden(tmp_path / "garden")
    yield garden
    survivors = garden.tear_down()
    assert not survivors, "\n".join(survivors)


# -- helpers -----------------------------------------------------------------------------------

def start_watch(garden: WatchedGarden, models: list[dict], *args: str) -> Watch:
    """Save ``models``, start watching and wait until every one of them is ready."""
    garden.save(models)
    watch = garden.watch(*args)
    for entry in models:
        watch.wait_event("ready", garden.worker_id(entry["name"]), timeout=STARTUP)
    return watch


def stop_watch_leaving_workers(garden: WatchedGarden, watch: Watch) -> None:
    """SIGTERM ends the watcher cleanly and leaves every worker as it was."""
    running = garden.worker_pids()
    assert watch.stop() == 0, watch.describe()
    assert watch.since(name="stopped"), watch.describe()
    assert garden.worker_pids() == running


def ok_event(name: str, worker_id: str):
    """A predicate: the action ``name`` on ``worker_id`` succeeded."""
    return lambda e: e.name == name and e.worker == worker_id and e.data.get("ok")


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def version_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def watch_status_once(garden: WatchedGarden, predicate) -> dict:
    """watch.json once ``predicate`` holds for it (the watcher writes it when a pass ends, just
    after the pass's last event)."""
    found: list[dict] = []

    def check() -> bool:
        found[:] = [garden.watch_status()]
        return predicate(found[0])

    wait_until(check, "watch.json shows the pass", timeout=5)
    return found[0]


def actions_since(watch: Watch, mark: int) -> list[tuple[str, str]]:
    """(event, worker) of every stop or start the watcher began since ``mark``."""
    return [(e.name, e.worker) for e in watch.since(mark) if e.name in ("stopping", "starting")]


# -- edits ---------------------------------------------------------------------------------------

def test_watch_learns_each_ready_worker_and_keeps_it_running(garden):
    alpha = garden.worker_id("alpha")
    watch = start_watch(garden, [model("alpha")])
    before = garden.worker_pids()

    def learned() -> list[dict]:
        run = garden.run("profiles", "-o", "json")
        return run.json()["profiles"] if run.code == 0 else []

    [profile] = wait_until(learned, "the watch learned alpha's profile", timeout=REACTION)
    assert profile["source"] == f"worker {alpha}"
    plan = garden.run("plan", "-o", "json").json()
    assert [m["memory_source"] for m in plan["models"]] == ["measured"]
    # The next pass (a save: a new version of the file) sizes alpha from its profile, and the
    # running worker keeps its claim: nothing is stopped or started.
    mark = watch.mark()
    text = garden.text([model("alpha")]) + "# learned\n"
    garden.save_text(text)
    watch_status_once(garden, lambda status: (status.get("last_applied") or {}).get("version")
                      == version_of(text))
    assert actions_since(watch, mark) == []
    assert garden.worker_pids() == before


def test_a_start_that_fails_for_memory_is_resized_and_becomes_ready(garden):
    # Graphs of 2.8 GiB (the estimate says 0.85) leave less KV cache than one 2,048-token
    # sequence needs: vLLM refuses, saying how much it lacked, and the next start has it.
    alpha = garden.worker_id("alpha")
    env = {"STANDIN_VLLM_CUDA_GRAPH": "2.8GiB"}
    garden.save([model("alpha", env=env)])
    watch = garden.watch()
    watch.wait_for("alpha's start failed", lambda e: e.worker == alpha
                   and e.data.get("cause") == "kv_cache_too_small", timeout=STARTUP)
    resized = watch.wait_event("resized", timeout=REACTION)
    grown = re.search(r"gpu_memory_utilization (0\.\d+) -> (0\.\d+)", resized.data["message"])
    assert grown and float(grown.group(2)) > float(grown.group(1)), watch.describe()
    watch.wait_event("ready", alpha, since=watch.index(resized), timeout=REACTION)


def test_each_edit_restarts_only_the_worker_it_changes(garden):
    alpha, beta, gamma = (garden.worker_id(n) for n in ("alpha", "beta", "gamma"))
    watch = start_watch(garden, [model("alpha"), model("beta")])
    before = garden.worker_pids()
    assert set(before) == {alpha, beta}

    mark = watch.mark()
    garden.save([model("alpha"), model("beta", max_model_len=4096)])
    watch.wait_for("beta replaced", ok_event("replace", beta), since=mark, timeout=REACTION)
    after = garden.worker_pids()
    assert after[alpha] == before[alpha]
    assert after[beta] != before[beta]
    assert garden.flag(beta, "--max-model-len") == "4096"
    assert actions_since(watch, mark) == [("stopping", beta), ("starting", beta)]

    mark = watch.mark()
    garden.save([model("alpha"), model("beta", max_model_len=4096), model("gamma")])
    watch.wait_for("gamma started", ok_event("start", gamma), since=mark, timeout=REACTION)
    watch.wait_event("ready", gamma, since=mark, timeout=REACTION)
    added = garden.worker_pids()
    assert {alpha: added[alpha], beta: added[beta]} == {alpha: after[alpha], beta: after[beta]}
    assert actions_since(watch, mark) == [("starting", gamma)]

    mark = watch.mark()
    garden.save([model("beta", max_model_len=4096), model("gamma")])
    watch.wait_for("alpha stopped", ok_event("stop", alpha), since=mark, timeout=REACTION)
    assert garden.worker_pids() == {beta: added[beta], gamma: added[gamma]}
    assert actions_since(watch, mark) == [("stopping", alpha)]

    status = garden.status()
    assert status["in_sync"] is True
    assert {w["worker"]: (w["phase"], w["pid"]) for w in status["workers"]} == {
        beta: ("ready", added[beta]), gamma: ("ready", added[gamma])}
    stop_watch_leaving_workers(garden, watch)


# -- versions that are refused --------------------------------------------------------------------

def test_broken_saves_change_nothing_and_a_fix_converges(garden):
    alpha, beta = garden.worker_id("alpha"), garden.worker_id("beta")
    good = [model("alpha"), model("beta")]
    watch = start_watch(garden, good)
    running = garden.worker_pids()
    applied = version_of(garden.file.read_text())
    first_pass_done = watch.mark()
    beta_line = MODELS_LINE + 1

    # A YAML syntax error (an unclosed flow sequence on beta's line).
    broken = garden.text(good).splitlines()
    broken[beta_line - 1] = '  - {"name": "beta", "model": [Qwen/Qwen3-0.6B'
    mark = watch.mark()
    garden.save_text("\n".join(broken) + "\n")
    event = watch.wait_event("invalid", since=mark, timeout=REACTION,
                             where=lambda e: "issues" in e.data)
    (issue,) = event.data["issues"]
    assert issue["file"] == "garden.yaml" and issue["line"] in (beta_line, beta_line + 1)
    location = f"garden.yaml:{issue['line']}:"
    watch.wait_for("the issue's own line", lambda e: e.name == "invalid"
                   and e.data["message"].startswith(location), since=mark, timeout=2)

    # A schema error: a value of the wrong type, located at its field.
    mark = watch.mark()
    garden.save([model("alpha"), model("beta", max_model_len="banana")])
    event = watch.wait_event("invalid", since=mark, timeout=REACTION,
                             where=lambda e: "issues" in e.data)
    (issue,) = event.data["issues"]
    assert (issue["file"], issue["line"], issue["path"]) == (
        "garden.yaml", beta_line, "models[1].max_model_len")

    # A garden that does not fit the GPUs.
    mark = watch.mark()
    garden.save([model("alpha"), model("beta", replicas=30)])
    event = watch.wait_event("rejected", since=mark, timeout=REACTION,
                             where=lambda e: "attempted" in e.data)
    assert "does not fit" in event.data["message"]

    # A version that would stop every worker (without --allow-empty).
    mark = watch.mark()
    empty = garden.text([]).replace("models:\n", "models: []\n")
    garden.save_text(empty)
    event = watch.wait_event("rejected", since=mark, timeout=REACTION,
                             where=lambda e: "--allow-empty" in e.data["message"])
    assert event.data["applied"] == applied

    assert watch.running
    assert garden.worker_pids() == running
    assert actions_since(watch, first_pass_done) == []
    report = watch_status_once(garden, lambda r: r["last_attempted"]["version"]
                               == version_of(empty))
    assert report["last_applied"]["version"] == applied
    assert report["last_attempted"]["accepted"] is False
    assert "--allow-empty" in report["last_attempted"]["error"]

    # The file deleted (some editors delete, then write).
    mark = watch.mark()
    garden.file.unlink()
    event = watch.wait_event("invalid", since=mark, timeout=REACTION)
    assert "cannot read garden.yaml" in event.data["message"]
    assert watch.running and garden.worker_pids() == running

    mark = watch.mark()
    garden.save([model("alpha"), model("beta", max_model_len=3072)])
    watch.wait_for("beta replaced", ok_event("replace", beta), since=mark, timeout=REACTION)
    watch.wait_event("ready", beta, since=mark, timeout=REACTION)
    assert watch.since(mark, name="accepted")
    after = garden.worker_pids()
    assert after[alpha] == running[alpha] and after[beta] != running[beta]
    assert garden.flag(beta, "--max-model-len") == "3072"
    status = garden.status()
    assert status["in_sync"] is True and status["watch"]["running"] is True
    fixed = version_of(garden.file.read_text())
    assert status["watch"]["last_applied"]["version"] == fixed
    attempted = status["watch"]["last_attempted"]
    assert (attempted["version"], attempted["accepted"]) == (fixed, True)
    stop_watch_leaving_workers(garden, watch)


def test_unfit_version_is_rejected_with_the_models_file_and_line(garden):
    watch = start_watch(garden, [model("alpha")])
    mark = watch.mark()
    garden.save([model("alpha", replicas=30)])
    verdict = watch.wait_event("rejected", since=mark, timeout=REACTION,
                               where=lambda e: "attempted" in e.data)
    assert watch.running and actions_since(watch, mark) == []
    located = [e for e in watch.since(mark) if e.name == "rejected"
               and e.data["message"].startswith(f"garden.yaml:{MODELS_LINE}:")]
    assert located, verdict
    stop_watch_leaving_workers(garden, watch)


def test_version_that_stops_every_worker_needs_allow_empty(garden):
    alpha = garden.worker_id("alpha")
    watch = start_watch(garden, [model("alpha")])
    running = garden.worker_pids()
    mark = watch.mark()
    garden.save_text(garden.text([]).replace("models:\n", "models: []\n"))
    watch.wait_event("rejected", since=mark, timeout=REACTION)
    assert garden.worker_pids() == running
    stop_watch_leaving_workers(garden, watch)

    allowing = garden.watch("--allow-empty")
    allowing.wait_for("alpha stopped", ok_event("stop", alpha), timeout=STARTUP)
    assert not allowing.since(name="rejected")
    assert garden.worker_pids() == {}
    assert allowing.stop() == 0, allowing.describe()
    assert allowing.since(name="stopped")


# -- crashes -----------------------------------------------------------------------------------

def test_dead_worker_restarts_and_a_crash_loop_backs_off_without_starving_others(garden):
    alpha, crasher, late = (garden.worker_id(n) for n in ("alpha", "crasher", "late"))
    watch = start_watch(garden, [model("alpha")])
    old = garden.worker_pids()[alpha]

    mark = watch.mark()
    os.killpg(old, signal.SIGKILL)
    watch.wait_event("exited", since=mark, timeout=REACTION)
    watch.wait_for("alpha restarted", ok_event("restart", alpha), since=mark, timeout=REACTION)
    new = garden.worker_pids()[alpha]
    assert new != old

    crashing = model("crasher", env={"STANDIN_VLLM_FAIL": "crash_after_ready",
                                     "STANDIN_VLLM_CRASH_AFTER": "0.8"})
    mark = watch.mark()
    garden.save([model("alpha"), crashing])
    watch.wait_for("crasher started", ok_event("start", crasher), since=mark, timeout=REACTION)
    first_crash = watch.wait_event("crashed", crasher, since=mark, timeout=REACTION)
    assert first_crash.data["cause"] == "engine_dead"
    restart = watch.wait_event("starting", crasher, since=watch.index(first_crash),
                               timeout=REACTION)
    assert restart.at - first_crash.at < 3.0  # the first restart is immediate
    backoff = watch.wait_event("backoff", crasher, since=mark, timeout=REACTION)
    assert 8.0 <= backoff.data["seconds"] <= 10.0 and backoff.data["failures"] == 2

    # While the crasher is held, a model added meanwhile still starts.
    held = watch.mark()
    garden.save([model("alpha"), crashing, model("late")])
    watch.wait_for("late started", ok_event("start", late), since=held, timeout=REACTION)
    time.sleep(max(0.0, backoff.at + NO_START_WINDOW - time.monotonic()))  # a window: no start
    assert watch.since(held, name="starting", worker=crasher) == []

    status = garden.status()
    rows = {w["worker"]: w for w in status["workers"]}
    assert rows[crasher]["phase"] == "crashed"
    assert rows[crasher]["restarts"] == 1
    assert rows[crasher]["last_error"]
    assert any("EngineDeadError" in line for line in rows[crasher]["last_log_lines"])
    assert rows[crasher]["backoff"]["failures"] == 2
    assert (rows[alpha]["phase"], rows[alpha]["pid"], rows[alpha]["restarts"]) == (
        "ready", new, 1)
    assert rows[late]["phase"] == "ready"
    report = garden.watch_status()
    current = version_of(garden.file.read_text())
    assert report["last_applied"]["version"] == current
    assert report["last_attempted"]["version"] == current
    assert report["last_attempted"]["accepted"] is True
    assert report["backoff"][crasher]["failures"] == 2
    assert report["backoff"][crasher]["next_start_after"] > time.time()

    # When the backoff expires it is started again (about 10 s after it was held).
    again = watch.wait_event("starting", crasher, since=held, timeout=REACTION)
    assert 8.0 <= again.at - backoff.at <= 14.0
    second = watch.wait_event("backoff", crasher, since=held, timeout=REACTION)
    assert 18.0 <= second.data["seconds"] <= 20.0 and second.data["failures"] == 3
    stop_watch_leaving_workers(garden, watch)


def test_worker_failing_at_start_is_retried_at_once_then_backed_off(garden):
    oomer = garden.worker_id("oomer")
    watch = start_watch(garden, [model("alpha")])
    mark = watch.mark()
    garden.save([model("alpha"), model("oomer", env={"STANDIN_VLLM_FAIL": "oom"})])
    failed = watch.wait_event("failed", oomer, since=mark, timeout=REACTION)
    assert failed.data["ok"] is False and failed.data["cause"] == "out_of_memory"
    assert "CUDA out of memory" in failed.data["message"]
    retried = watch.wait_event("starting", oomer, since=watch.index(failed), timeout=4.0)
    assert retried.at - failed.at < 3.0
    backoff = watch.wait_event("backoff", oomer, since=mark, timeout=REACTION)
    assert 8.0 <= backoff.data["seconds"] <= 10.0 and backoff.data["failures"] == 2
    status = garden.status()  # between attempts the failing worker is still shown
    row = {w["worker"]: w for w in status["workers"]}[oomer]
    assert (row["phase"], row["cause"], row["next_step"]) == ("failed", "out_of_memory", "hold")
    assert row["backoff"]["failures"] == 2 and row["backoff"]["next_start_after"] > time.time()
    stop_watch_leaving_workers(garden, watch)


def test_killed_main_process_is_restarted_without_leaving_its_engine_behind(garden):
    alpha = garden.worker_id("alpha")
    watch = start_watch(garden, [model("alpha", env={"STANDIN_VLLM_SPAWN_CHILD": "1"})])
    main = garden.worker_pids()[alpha]
    (engine,) = [p for p in garden.processes() if p.pid != main]  # the "VLLM::EngineCore"
    mark = watch.mark()
    os.kill(main, signal.SIGKILL)  # `kill -9 PID`: vLLM's EngineCore outlives its parent
    try:
        watch.wait_for("alpha restarted", ok_event("restart", alpha), since=mark,
                       timeout=REACTION)
        new = garden.worker_pids()[alpha]
        assert {os.getpgid(p.pid) for p in garden.processes()} == {new}
        assert not alive(engine)
    finally:
        if alive(engine):
            engine.kill()  # so that the fixture's check sees only what down should stop
    stop_watch_leaving_workers(garden, watch)


def test_edit_during_a_neighbours_load_keeps_the_edited_worker_serving(garden):
    alpha, slow = garden.worker_id("alpha"), garden.worker_id("slow")
    on_gpu0 = {"placement": {"gpus": [0]}}
    loading = model("slow", env={"STANDIN_VLLM_READY_DELAY": "5"}, **on_gpu0)
    watch = start_watch(garden, [model("alpha", **on_gpu0)])
    old = psutil.Process(garden.worker_pids()[alpha])
    mark = watch.mark()
    garden.save([model("alpha", **on_gpu0), loading])
    watch.wait_event("starting", slow, since=mark, timeout=REACTION)
    garden.save([model("alpha", max_model_len=4096, **on_gpu0), loading])

    def slow_is_ready() -> bool:
        return any(e.worker == slow and e.name == "ready" for e in watch.since(mark))

    deadline = time.monotonic() + REACTION
    while not slow_is_ready() and time.monotonic() < deadline:
        assert alive(old), "alpha was stopped while slow was still loading on its GPU"
        time.sleep(0.05)
    watch.wait_for("alpha replaced", ok_event("replace", alpha), since=mark, timeout=REACTION)
    assert garden.flag(alpha, "--max-model-len") == "4096"
    stop_watch_leaving_workers(garden, watch)


# -- how editors save -----------------------------------------------------------------------------

def test_editor_saves_and_a_burst_of_saves_converge_on_the_last_version(garden):
    alpha, beta = garden.worker_id("alpha"), garden.worker_id("beta")
    watch = start_watch(garden, [model("alpha"), model("beta")])
    alpha_pid = garden.worker_pids()[alpha]

    # vim-style: a swap file, a backup (garden.yaml~), the new text written to a temporary
    # file beside the garden and renamed over it; the swap file goes when the save is done.
    mark = watch.mark()
    swap = garden.file.with_name(".garden.yaml.swp")
    swap.write_bytes(b"b0VIM 9.0")
    shutil.copyfile(garden.file, garden.file.with_name("garden.yaml~"))
    written = garden.file.with_name("garden.yaml.tmp")
    written.write_text(garden.text([model("alpha"), model("beta", max_model_len=4096)]))
    os.rename(written, garden.file)
    swap.unlink()
    watch.wait_for("beta replaced", ok_event("replace", beta), since=mark, timeout=REACTION)
    assert garden.flag(beta, "--max-model-len") == "4096"

    # sed -i: a temporary file in the same folder renamed over the garden file.
    mark = watch.mark()
    subprocess.run(["sed", "-i", "s/\"max_model_len\": 4096/\"max_model_len\": 1024/",
                    str(garden.file)], check=True)
    watch.wait_for("beta replaced", ok_event("replace", beta), since=mark, timeout=REACTION)
    assert garden.flag(beta, "--max-model-len") == "1024"

    # 50 complete saves in about half a second, alternating, the last one different.
    mark = watch.mark()
    values = [2048 if i % 2 else 4096 for i in range(49)] + [3072]
    for value in values:
        garden.save([model("alpha"), model("beta", max_model_len=value)])
        time.sleep(0.01)
    wait_until(lambda: garden.flag(beta, "--max-model-len") == "3072",
               "beta runs the last saved max_model_len", timeout=REACTION)
    watch.wait_quiet(2.0)
    assert garden.flag(beta, "--max-model-len") == "3072"
    assert garden.worker_pids()[alpha] == alpha_pid
    assert watch.since(mark, name="invalid") == []
    changing_passes = watch.since(mark, name="plan")
    assert 1 <= len(changing_passes) <= 4, watch.describe()
    status = garden.status()
    assert status["in_sync"] is True
    assert {w["worker"]: w["phase"] for w in status["workers"]} == {alpha: "ready",
                                                                     beta: "ready"}
    stop_watch_leaving_workers(garden, watch)


def next_second_after_mtime(path) -> None:
    """Until the clock is in a later second than ``path``'s modification time."""
    wait_until(lambda: time.time() >= int(path.stat().st_mtime) + 1, "next second", timeout=2)


def test_poll_mode_reacts_to_a_save(garden):
    alpha = garden.worker_id("alpha")
    watch = start_watch(garden, [model("alpha")], "--poll")
    assert "polling" in watch.since(name="watching")[0].data["message"]
    old = garden.worker_pids()[alpha]
    next_second_after_mtime(garden.file)  # see the test below for saves within one second
    mark = watch.mark()
    saved = garden.save([model("alpha", max_model_len=4096)])
    replaced = watch.wait_for("alpha replaced", ok_event("replace", alpha), since=mark,
                              timeout=REACTION)
    assert replaced.at - saved < 5.0
    assert garden.worker_pids()[alpha] != old
    assert garden.flag(alpha, "--max-model-len") == "4096"
    stop_watch_leaving_workers(garden, watch)


def test_poll_mode_converges_on_two_saves_within_one_second(garden):
    """Whole-second mtimes (watchfiles' poller, many network file systems) cannot tell two
    saves in one second apart: the second must still be applied."""
    alpha = garden.worker_id("alpha")
    watch = start_watch(garden, [model("alpha")], "--poll", "--debounce", "0")
    for first in (4096, 1024, 2560):  # until the poller notices a save early in its second
        next_second_after_mtime(garden.file)
        wait_until(lambda: time.time() % 1 < 0.1, "start of a second", timeout=2)
        mark = watch.mark()
        garden.save([model("alpha", max_model_len=first)])
        second = int(garden.file.stat().st_mtime)
        watch.wait_event("plan", since=mark, timeout=REACTION)
        if time.time() < second + 0.8:
            break
        watch.wait_for("alpha replaced", ok_event("replace", alpha), since=mark,
                       timeout=REACTION)
    else:
        pytest.skip("the poller never noticed a save within 0.8 s of its second")
    garden.save([model("alpha", max_model_len=3072)])  # while the pass for `first` runs
    if int(garden.file.stat().st_mtime) != second:
        pytest.skip("the second save did not land in the same second")
    wait_until(lambda: garden.flag(alpha, "--max-model-len") == "3072",
               "alpha runs the last saved max_model_len", timeout=5.0)
    stop_watch_leaving_workers(garden, watch)


# -- one writer at a time -------------------------------------------------------------------------

def test_second_watch_and_apply_are_refused_while_watching(garden):
    watch = start_watch(garden, [model("alpha")])
    running = garden.worker_pids()
    for argv in (("watch",), ("apply", "--yes")):
        refused = garden.run(*argv, timeout=20)
        assert refused.code == 1, str(refused)
        assert f"pid {watch.pid}" in refused.err and "gardenctl watch" in refused.err, \
            str(refused)
    assert watch.running
    assert garden.worker_pids() == running
    stop_watch_leaving_workers(garden, watch)
