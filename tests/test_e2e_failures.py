"""Failures as a user meets them, through the real CLI: a worker killed under gardenctl, a
gardenctl killed mid-apply, two applies at once, workers that cannot start (told apart in
apply's report), and workers that resist being stopped."""

from __future__ import annotations

import os
import re
import signal
import socket

import psutil
import pytest
from e2e_helpers import (
    alive,
    free_port,
    garden_at,
    lock_is_free,
    model,
    served_names,
    wait_until,
)

pytestmark = pytest.mark.e2e

SLOW = 1.5  # seconds of loading for a worker that an apply is interrupted on


@pytest.fixture
def garden(tmp_path):
    with garden_at(tmp_path / "garden") as created:
        yield created


def engine_core_of(pid: int) -> psutil.Process:
    (child,) = psutil.Process(pid).children()
    assert "VLLM::EngineCore" in child.cmdline()
    return child


# -- a worker killed under gardenctl -------------------------------------------------------


def test_killed_worker_is_shown_crashed_then_planned_and_started_again(garden):
    garden.applied([model("a"), model("b")])
    pids = garden.pids()
    a, b = garden.worker_id("a"), garden.worker_id("b")
    os.killpg(pids[a], signal.SIGKILL)
    assert wait_until(lambda: not alive(pids[a]))

    row = garden.workers()[a]
    assert row["phase"] == "crashed" and row["last_error"] and row["pid"] == pids[a]
    plan = garden.run("plan")
    assert plan.code == 0, str(plan)
    assert re.search(rf"\^ restart +{re.escape(a)} .*\n.*starting it again", plan.out), plan.out
    assert "0 to start, 0 to replace, 1 to restart, 0 to stop, 1 unchanged" in plan.out

    run = garden.apply()

    assert run.code == 0, str(run)
    rows = garden.workers()
    assert (rows[a]["phase"], rows[a]["restarts"]) == ("ready", 1)
    assert rows[a]["pid"] != pids[a] and served_names(rows[a]["port"]) == {"a"}
    assert rows[a]["last_error"]  # why its previous run ended, until this one ends
    assert (rows[b]["pid"], rows[b]["restarts"]) == (pids[b], 0)


def test_crash_reason_says_the_worker_died_rather_than_quoting_its_log(garden):
    garden.applied([model("a")])
    a = garden.worker_id("a")
    pid = garden.pids()[a]
    os.killpg(pid, signal.SIGKILL)
    assert wait_until(lambda: not alive(pid))

    reason = garden.workers()[a]["last_error"]

    assert re.search(r"killed|signal|exit|died|unexpected", reason, re.I), reason


def test_restart_after_the_main_process_was_killed_stops_its_leftover_engine_core(garden):
    garden.applied([model("a", env={"STANDIN_VLLM_SPAWN_CHILD": "1"})])
    pid = garden.pids()[garden.worker_id("a")]
    engine_core = engine_core_of(pid)
    os.kill(pid, signal.SIGKILL)  # the main pid only, as a careless `kill -9 PID` does
    assert wait_until(lambda: not alive(pid))
    assert alive(engine_core.pid)  # like vLLM's EngineCore, it outlives its parent

    run = garden.apply()

    assert run.code == 0, str(run)
    assert not alive(engine_core.pid), "the old EngineCore still runs (it would hold GPU memory)"


def test_down_after_the_main_process_was_killed_stops_its_leftover_engine_core(garden):
    garden.applied([model("a", env={"STANDIN_VLLM_SPAWN_CHILD": "1"})])
    pid = garden.pids()[garden.worker_id("a")]
    engine_core = engine_core_of(pid)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not alive(pid))

    run = garden.run("down", "--yes")

    assert run.code == 0, str(run)
    assert not alive(engine_core.pid), "the old EngineCore still runs (it would hold GPU memory)"


# -- gardenctl killed, or busy -------------------------------------------------------------


def start_slow_apply(garden, delay: float = SLOW):
    """Start `apply --yes` on one worker that loads for ``delay`` seconds; return (the apply
    process, the worker's record) once the worker has been spawned and recorded."""
    garden.write([model("slow", env={"STANDIN_VLLM_READY_DELAY": str(delay)})])
    apply = garden.start("apply", "--yes")
    record = wait_until(lambda: garden.record(garden.worker_id("slow")), timeout=15)
    assert record, "apply never recorded its worker"
    assert apply.poll() is None, "apply finished before the slow worker was ready"
    return apply, record


def test_gardenctl_killed_mid_apply_leaves_the_worker_loading_and_the_next_apply_converges(
        garden):
    apply, record = start_slow_apply(garden)
    worker_id = garden.worker_id("slow")

    os.kill(apply.pid, signal.SIGKILL)
    assert apply.wait(timeout=10) == -signal.SIGKILL

    assert alive(record["pid"])  # the worker is in its own session: it keeps loading
    assert garden.record(worker_id)["pid"] == record["pid"]
    assert lock_is_free(garden.lock_path)  # the kernel released the dead holder's flock
    run = garden.apply()
    assert run.code == 0, str(run)
    assert "still loading" in run.out and "ok   await" in run.out  # it waited for the worker
    assert served_names(record["spec"]["port"]) == {"slow"}
    assert garden.group_leaders() == {worker_id: {record["pid"]}}  # no duplicate, no orphan
    assert garden.pids() == {worker_id: record["pid"]}
    status = garden.status()
    assert status["in_sync"] is True
    assert [(w["phase"], w["restarts"]) for w in status["workers"]] == [("ready", 0)]


def test_second_apply_fails_fast_and_names_the_lock_holder(garden):
    first, _ = start_slow_apply(garden, delay=2.5)  # ample time for the second one to fail
    assert not lock_is_free(garden.lock_path)

    second = garden.apply()

    assert first.poll() is None, "the first apply should still be waiting for its worker"
    assert second.code == 1, str(second)
    assert second.elapsed < 2.0
    assert f"pid {first.pid}" in second.err and "`gardenctl apply`" in second.err
    assert re.search(r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", second.err), second.err
    out, err = first.communicate(timeout=30)
    assert first.returncode == 0, out + err
    assert len(garden.group_leaders()) == 1


def test_worker_found_by_its_marker_without_a_record_is_adopted_not_duplicated(garden):
    # As if gardenctl had been killed between spawning the worker and writing its record.
    garden.applied([model("a")])
    worker_id = garden.worker_id("a")
    pid = garden.pids()[worker_id]
    port = garden.record(worker_id)["spec"]["port"]
    garden.record_path(worker_id).unlink()
    # Killed before the record, gardenctl never learned the worker's profile either (a
    # profile would size the model anew, and the worker would no longer match the plan).
    assert garden.run("profiles", "forget").code == 0

    plan = garden.run("plan")
    run = garden.apply()

    assert "no record: adopting it" in plan.out, plan.out
    assert run.code == 0, str(run)
    assert "adopted: record written" in run.out
    assert garden.group_leaders() == {worker_id: {pid}}
    assert (garden.record(worker_id) or {}).get("pid") == pid
    assert served_names(port) == {"a"}
    status = garden.status()
    assert status["in_sync"] is True
    assert [(w["worker"], w["phase"]) for w in status["workers"]] == [(worker_id, "ready")]


# -- workers that cannot start -------------------------------------------------------------


@pytest.mark.parametrize("mode,cause,log_line", [
    ("oom", "out_of_memory", "CUDA out of memory"),
    ("kv_cache", "kv_cache_too_small", "estimated maximum model length is"),
    ("model_not_found", "model_not_found", "is not a local folder and is not a valid model"),
])
def test_worker_failing_to_start_is_reported_with_its_cause(garden, mode, cause, log_line):
    garden.write([model("a", env={"STANDIN_VLLM_FAIL": mode})])

    run, report = garden.apply_json()

    assert run.code == 1, str(run)
    (result,) = report["results"]
    assert (result["ok"], result["outcome"], result["cause"]) == (False, "exited_before_ready",
                                                                  cause)
    assert log_line in result["log_tail"]
    if mode == "kv_cache":
        assert isinstance(result["suggested_max_model_len"], int)
        assert 0 < result["suggested_max_model_len"] < 2048
        assert str(result["suggested_max_model_len"]) in result["hint"]
    else:
        assert result["suggested_max_model_len"] is None
    assert report["ok"] is False
    assert garden.processes() == []
    row = garden.workers()[garden.worker_id("a")]  # a run that never got ready: failed
    assert row["phase"] == "failed" and row["last_error"] and row["cause"] == cause


def test_port_taken_by_a_foreign_process_is_shown_by_plan_and_nothing_is_spawned(garden):
    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        garden.write([model("a", port=port)])

        plan = garden.run("plan")
        run, report = garden.apply_json()

    assert plan.code == 0, str(plan)
    assert re.search(rf"! wait +{re.escape(garden.worker_id('a'))} ", plan.out), plan.out
    assert f"port {port} is in use by pid {os.getpid()}" in plan.out  # and among the warnings
    assert run.code == 1, str(run)
    (result,) = report["results"]
    assert (result["ok"], result["outcome"]) == (False, "held")
    assert f"port {port}" in result["message"] and f"pid {os.getpid()}" in result["message"]
    assert garden.processes() == []
    assert not (garden.logs_dir / "a.0.log").exists()  # nothing was spawned


def test_worker_never_ready_is_stopped_after_its_start_timeout(garden):
    garden.write([model("a", start_timeout="1s", env={"STANDIN_VLLM_FAIL": "hang"})])

    run, report = garden.apply_json()

    assert run.code == 1, str(run)
    (result,) = report["results"]
    assert (result["ok"], result["outcome"]) == (False, "health_check_timed_out")
    assert "start timeout of 1s" in result["message"] and "stopped it" in result["message"]
    assert 1.0 <= result["elapsed_s"] < 5.0
    assert garden.processes() == []
    row = garden.workers()[garden.worker_id("a")]  # still shown, with why it failed
    assert (row["phase"], row["cause"]) == ("failed", "start_timeout")


# -- workers that resist being stopped -----------------------------------------------------


def test_worker_ignoring_sigterm_is_sigkilled_with_its_whole_group_when_removed(garden):
    stubborn = model("stubborn", shutdown_timeout="1s",
                     env={"STANDIN_VLLM_IGNORE_SIGTERM": "1", "STANDIN_VLLM_SPAWN_CHILD": "1"})
    garden.applied([model("keeper"), stubborn])
    keeper, worker_id = garden.worker_id("keeper"), garden.worker_id("stubborn")
    keeper_pid = garden.pids()[keeper]
    group = garden.process_groups()[worker_id]
    assert len(group) == 2  # the server and its EngineCore child
    garden.write([model("keeper")])

    run, report = garden.apply_json()

    assert run.code == 0, str(run)
    (result,) = report["results"]
    assert (result["worker"], result["action"], result["ok"]) == (worker_id, "stop", True)
    assert "SIGKILL" in result["message"]
    assert result["elapsed_s"] >= 1.0  # it was given its shutdown_timeout first
    assert not any(alive(pid) for pid in group)
    assert worker_id not in garden.process_groups()
    assert garden.pids() == {keeper: keeper_pid}
    log = (garden.logs_dir / "stubborn.0.log").read_text()
    assert "Received SIGTERM; ignoring it" in log


def test_down_stops_a_worker_and_its_engine_core_child(garden):
    garden.applied([model("a", env={"STANDIN_VLLM_SPAWN_CHILD": "1"})])
    pid = garden.pids()[garden.worker_id("a")]
    engine_core = engine_core_of(pid)

    run = garden.run("down", "--yes")

    assert run.code == 0, str(run)
    assert not alive(pid) and not alive(engine_core.pid)
    assert garden.processes() == []

