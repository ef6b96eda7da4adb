"""The control loop under the conditions of a real fleet, end to end with real processes:
loads that take long, engines that die behind a live API server, edits that break a model.

Each test is a scenario a user met with gardenctl 0.1 (see the issue "A control loop you can
trust"); each asserts what the user notices (which processes run, what answers, what the
commands print), waiting on events, never on clocks.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from e2e_helpers import alive, garden_at, http_get, served_names, wait_until
from e2e_helpers import model as apply_model
from watch_helpers import WatchedGarden, model

pytestmark = pytest.mark.e2e

STARTUP = 30.0
REACTION = 20.0


@pytest.fixture
def watched(tmp_path):
    garden = WatchedGarden(tmp_path / "garden")
    yield garden
    survivors = garden.tear_down()
    assert not survivors, "\n".join(survivors)


@pytest.fixture
def garden(tmp_path):
    with garden_at(tmp_path / "garden") as garden:
        yield garden


def ready(watch, worker_id, since=0):
    return watch.wait_event("ready", worker_id, since=since, timeout=STARTUP)


# -- 1. a start in progress never blocks the loop --------------------------------------------

def test_watch_restarts_a_killed_worker_at_once_while_another_hangs_loading(watched):
    alpha, slow = watched.worker_id("alpha"), watched.worker_id("slow")
    hanging = model("slow", start_timeout="15m", placement={"gpus": [1]},
                    env={"STANDIN_VLLM_FAIL": "hang"})
    watched.save([model("alpha", placement={"gpus": [0]}), hanging])
    watch = watched.watch()
    ready(watch, alpha)
    watch.wait_event("start", slow, timeout=STARTUP)
    slow_pid = watched.worker_pids()[slow]
    old = watched.worker_pids()[alpha]

    mark = watch.mark()
    os.killpg(old, signal.SIGKILL)
    died = watch.wait_event("exited", since=mark, timeout=REACTION)
    restarted = watch.wait_event("starting", alpha, since=mark, timeout=REACTION)
    ready(watch, alpha, since=watch.index(restarted))

    assert watched.worker_pids()[slow] == slow_pid  # still loading, never touched
    assert watch.since(mark, name="starting", worker=slow) == []
    assert watch.since(mark, name="stopping", worker=slow) == []
    rows = {w["worker"]: w for w in watched.status()["workers"]}
    assert (rows[slow]["phase"], rows[slow]["gpus"]) == ("starting", [1])
    assert (rows[alpha]["phase"], rows[alpha]["gpus"], rows[alpha]["restarts"]) == (
        "ready", [0], 1)
    assert restarted.at >= died.at
    assert watch.stop() == 0


# -- 2. liveness: an engine that died behind a live API server ------------------------------

ZOMBIE_ENGINE = {"STANDIN_VLLM_FAIL": "crash_after_ready", "STANDIN_VLLM_CRASH_AFTER": "1.0",
                 "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"}


def test_watch_restarts_a_worker_whose_health_fails_its_threshold(watched):
    alpha = watched.worker_id("alpha")
    watched.save([model("alpha", env=ZOMBIE_ENGINE,
                        liveness={"period": "0.5s", "failure_threshold": 2})])
    watch = watched.watch()
    ready(watch, alpha)
    old = watched.worker_pids()[alpha]

    failed_probe = watch.wait_event("probe", alpha, timeout=REACTION)
    assert "(1/2)" in failed_probe.data["message"] and "503" in failed_probe.data["message"]
    unhealthy = watch.wait_event("unhealthy", alpha, timeout=REACTION)
    assert "/health answered 503 (2 probes in a row)" in unhealthy.data["message"]
    restart = watch.wait_for("the restart", lambda e: e.name == "restart" and
                             e.worker == alpha and e.data.get("ok"),
                             since=watch.index(unhealthy), timeout=REACTION)
    ready(watch, alpha, since=watch.index(restart))
    assert watched.worker_pids()[alpha] != old and not alive(old)
    row = {w["worker"]: w for w in watched.status()["workers"]}[alpha]
    # every run of this engine dies a second after it is ready, so the restarted run may have
    # failed its own probes (503, or no answer on a loaded machine) by the time status is read
    assert row["restarts"] >= 1 and row["last_error"].startswith("unhealthy: /health ")
    assert watch.stop() == 0


def test_status_shows_a_dead_engine_and_apply_restarts_it(garden):
    a = garden.worker_id("a")
    garden.applied([apply_model("a", env=ZOMBIE_ENGINE)])
    pid = garden.pids()[a]
    port = garden.record(a)["spec"]["port"]
    deadline = time.monotonic() + REACTION
    while http_get(port, "/health")[0] != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http_get(port, "/health")[0] == 503 and alive(pid)

    status = garden.status()
    assert status["in_sync"] is False
    (row,) = status["workers"]
    assert (row["phase"], row["next_step"]) == ("unhealthy", "restart")
    plan = garden.run("plan")
    assert "unhealthy: /health answered 503 (3 probes in a row); starting it again" in plan.out

    run, report = garden.apply_json()

    assert run.code == 0, str(run)
    (result,) = report["results"]
    assert (result["action"], result["outcome"]) == ("restart", "ready")
    assert garden.pids()[a] != pid and not alive(pid)


# -- 3. safe rollouts --------------------------------------------------------------------------

class Availability:
    """Polls every replica's /v1/models in the background; `down_moments` counts the polls at
    which no replica of the model answered."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.polls = 0
        self.down_moments = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            up = [port for port in self.ports if served_names(port)]
            self.polls += 1
            self.down_moments += not up
            self.stop.wait(0.05)

    def __enter__(self) -> Availability:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


@pytest.mark.parametrize("breakage", [{"args": ["--no-such-flag"]},
                                      {"env": {"STANDIN_VLLM_FAIL": "oom"}}],
                         ids=["unknown-flag", "env-change"])
def test_a_bad_edit_is_rolled_back_and_never_takes_the_model_down(garden, breakage):
    two = apply_model("m", replicas=2)
    garden.applied([two])
    before = garden.pids()
    ports = [garden.record(w)["spec"]["port"] for w in sorted(before)]

    garden.write([{**two, **breakage}])
    with Availability(ports) as availability:
        run, report = garden.apply_json()

    assert run.code == 1, str(run)
    assert availability.polls > 3 and availability.down_moments == 0
    outcomes = {(r["action"], r["worker"].rsplit("/", 2)[-2] + "/" + r["worker"][-1]):
                r["outcome"] for r in report["results"]}
    assert outcomes == {("replace", "m/0"): "exited_before_ready", ("rollback", "m/0"): "ready",
                        ("replace", "m/1"): "skipped"}
    after = garden.pids()
    assert after[garden.worker_id("m", 1)] == before[garden.worker_id("m", 1)]  # untouched
    versions = {garden.record(w)["spec"]["spec_hash"] for w in sorted(after)}
    assert versions == {garden.record(w)["spec"]["spec_hash"] for w in sorted(before)}
    status = garden.status()
    assert status["in_sync"] is False
    assert all(w["phase"] == "ready" for w in status["workers"])
    assert all("rollout stopped" in w["next_cause"] for w in status["workers"])
    again = garden.apply()  # the rejected version is not tried again
    assert "rollout stopped" in again.out and garden.pids() == after

    garden.write([{**two, "max_model_len": 1024}])  # a good edit goes through, one at a time
    with Availability(ports) as availability:
        fixed = garden.apply()
    assert fixed.code == 0, str(fixed)
    assert availability.down_moments == 0
    assert garden.status()["in_sync"] is True


def test_a_single_replica_replace_is_said_to_take_the_model_down(garden):
    garden.applied([apply_model("solo")])
    garden.write([apply_model("solo", max_model_len=1024)])
    plan = garden.run("plan")
    assert "the model is unavailable until its new version is ready (1 replica)" in plan.out


def test_watch_rolls_back_a_bad_edit_and_keeps_serving(watched):
    m0, m1 = watched.worker_id("m", 0), watched.worker_id("m", 1)
    good = model("m", replicas=2)
    watched.save([good])
    watch = watched.watch()
    ready(watch, m0)
    ready(watch, m1)
    before = watched.worker_pids()
    mark = watch.mark()
    watched.save([{**good, "env": {"STANDIN_VLLM_FAIL": "oom"}}])
    rollback = watch.wait_for("the rollback", lambda e: e.name == "rollback" and
                              e.worker == m0 and e.data.get("ok"), since=mark, timeout=REACTION)
    ready(watch, m0, since=watch.index(rollback))
    stopped = watch.wait_event("waiting", m1, since=mark, timeout=REACTION)
    assert stopped.data["message"].startswith("rollout stopped")
    assert watched.worker_pids()[m1] == before[m1]
    assert watch.since(mark, name="stopping", worker=m1) == []
    assert watch.stop() == 0


def test_watch_rolls_back_a_replacement_that_never_finishes_loading(watched):
    m0 = watched.worker_id("m")
    good = model("m", start_timeout="6s")
    watched.save([good])
    watch = watched.watch()
    ready(watch, m0)
    mark = watch.mark()
    watched.save([{**good, "env": {"STANDIN_VLLM_FAIL": "hang"}}])
    rollback = watch.wait_for("the rollback", lambda e: e.name == "rollback" and
                              e.worker == m0 and e.data.get("ok"), since=mark, timeout=REACTION)
    ready(watch, m0, since=watch.index(rollback))
    (row,) = watched.status()["workers"]
    serving = psutil.Process(watched.worker_pids()[m0]).environ()
    assert row["phase"] == "ready" and "STANDIN_VLLM_FAIL" not in serving  # the good version
    assert row["next_cause"].startswith("rollout stopped")
    assert "not ready within its start timeout of 6s" in row["next_cause"]
    assert watch.stop() == 0


# -- 4. a saved plan runs only as it was made ------------------------------------------------

def test_a_saved_plan_whose_argv_was_edited_is_refused_and_nothing_runs(garden):
    garden.write([apply_model("a")])
    assert garden.run("plan", "--out", "p.json").code == 0
    document = json.loads((garden.root / "p.json").read_text())
    marker = garden.root / "PWNED"
    document["steps"][0]["spec"]["argv"] = ["/usr/bin/touch", str(marker)]
    document["actions"][0]["spec"]["argv"] = ["/usr/bin/touch", str(marker)]
    (garden.root / "p.json").write_text(json.dumps(document))

    run = garden.apply("p.json")

    assert run.code == 1, str(run)
    assert "stale or was edited" in run.err and "differs (spec)" in run.err
    assert not marker.exists() and garden.processes() == []


# -- 5. workers get a minimal environment ----------------------------------------------------

def test_a_worker_does_not_inherit_unrelated_secrets_of_the_shell(tmp_path):
    exported = {"AWS_SECRET_ACCESS_KEY": "aws-secret-123", "DATABASE_URL": "postgres://u:p@db",
                "NCCL_DEBUG": "WARN"}
    with garden_at(tmp_path / "garden", extra_env=exported) as garden:
        garden.applied([apply_model("a", env={"MY_FLAG": "on"})])
        (process,) = garden.processes()
        env = process.environ()
        assert "AWS_SECRET_ACCESS_KEY" not in env and "DATABASE_URL" not in env
        assert (env["NCCL_DEBUG"], env["MY_FLAG"], env["HF_HOME"]) == (
            "WARN", "on", str(garden.root / "hf"))
        assert "GARDENCTL_STATE_DIR" not in env


# -- 6. one lock per garden ------------------------------------------------------------------

def test_a_watch_of_one_garden_does_not_block_apply_or_down_of_another(tmp_path):
    state = tmp_path / "state"
    with garden_at(tmp_path / "one", state=state) as one, \
            garden_at(tmp_path / "two", state=state) as two:
        one.write([apply_model("a")])
        two.write([apply_model("b")])
        watch = one.start("watch", "-o", "json")
        try:
            deadline = time.monotonic() + STARTUP
            while not one.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert one.pids(), "the watch never started its worker"
            applied = two.apply()
            assert applied.code == 0, str(applied)
            assert set(two.pids()) == {two.worker_id("b")}
            down = two.run("down", "--yes")
            assert down.code == 0, str(down)
            refused = one.apply()
            assert refused.code == 1 and f"pid {watch.pid}" in refused.err, str(refused)
            assert "`gardenctl watch`" in refused.err
        finally:
            watch.send_signal(signal.SIGTERM)
            watch.communicate(timeout=30)


def test_gardens_that_share_a_gpu_count_each_others_claims(tmp_path):
    state = tmp_path / "state"
    with garden_at(tmp_path / "one", state=state, gpus=1) as one, \
            garden_at(tmp_path / "two", state=state, gpus=1) as two:
        one.applied([apply_model("a")])  # about 6 GiB of the 10 GiB GPU
        two.write([apply_model("b")])
        plan = two.run("plan", "-o", "json")
        assert plan.code == 1, str(plan)  # it does not fit beside garden one's worker
        document = plan.json()
        (gpu,) = document["gpus"]
        claim = one.record(one.worker_id("a"))["spec"]["claim_bytes"]
        assert gpu["used_by_others_bytes"] == claim
        assert [u["worker"] for u in document["unplaced"]] == [two.worker_id("b")]


def test_gardens_sharing_a_gpu_never_start_two_workers_on_it_at_once(tmp_path):
    state = tmp_path / "state"
    slow = {"STANDIN_VLLM_READY_DELAY": "1.5", "STANDIN_VLLM_GPU_MEMORY": "48GiB"}
    with garden_at(tmp_path / "one", state=state, gpus=1) as one, \
            garden_at(tmp_path / "two", state=state, gpus=1) as two:
        for garden, name in ((one, "a"), (two, "b")):
            garden.write([apply_model(name, env=slow)])
            big_gpus(garden)
        first = one.start("apply", "--yes")
        second = two.start("apply", "--yes")
        assert first.wait(timeout=60) == 0, first.communicate()
        assert second.wait(timeout=60) == 0, second.communicate()
        a = one.record(one.worker_id("a"))
        b = two.record(two.worker_id("b"))
        runs = sorted([(a["started_at"], a["ready_at"]), (b["started_at"], b["ready_at"])])
        assert runs[1][0] >= runs[0][1]  # the second started once the first was ready


def test_nothing_is_stopped_or_started_on_a_gpu_where_another_garden_loads(tmp_path):
    state = tmp_path / "state"
    roomy = {"STANDIN_VLLM_GPU_MEMORY": "48GiB"}
    with garden_at(tmp_path / "one", state=state, gpus=1) as one, \
            garden_at(tmp_path / "two", state=state, gpus=1) as two:
        two.write([apply_model("b", env=roomy)])
        big_gpus(two)
        assert two.apply().code == 0
        running = two.pids()[two.worker_id("b")]
        one.write([apply_model("slow", env={**roomy, "STANDIN_VLLM_FAIL": "hang"})])
        big_gpus(one)
        loading = one.start("apply", "--yes")
        wait_until(one.pids, timeout=STARTUP)

        two.write([apply_model("b", env=roomy, max_model_len=1024)])
        big_gpus(two)
        plan = two.run("plan", "-o", "json", "--out", "p.json")
        (step,) = [s for s in plan.json()["steps"] if s["worker"] == two.worker_id("b")]
        assert (step["kind"], step["blocked_by"]) == ("wait", "gpu"), step
        assert f"is busy ({one.worker_id('slow')} is loading there)" in step["cause"]
        saved = two.run("apply", "--yes", "p.json")  # a saved plan runs as made: it waits
        assert saved.code == 1 and "is busy" in saved.out, str(saved)

        waiting = two.start("apply", "--yes")  # apply waits for the GPU, saying so
        said = lines_of(waiting.stderr)
        assert "is busy" in next(line for line in said if line.startswith("waiting: "))
        assert two.pids() == {two.worker_id("b"): running}  # the running version is untouched

        loading.send_signal(signal.SIGINT)
        assert loading.wait(timeout=30) == 130
        assert one.run("down", "--yes").code == 0
        assert waiting.wait(timeout=60) == 0  # the GPU is free: the edit goes through
        assert two.pids()[two.worker_id("b")] != running


def lines_of(stream) -> Iterator[str]:
    """The lines of a child's output as they come (a reader thread; ends with the stream)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    while (line := lines.get(timeout=STARTUP)) is not None:
        yield line


def test_a_saved_plan_with_a_replacement_or_a_restart_is_applied_as_shown(garden):
    garden.applied([apply_model("a"), apply_model("b")])
    garden.write([apply_model("a", max_model_len=1024), apply_model("b")])
    os.kill(garden.pids()[garden.worker_id("b")], signal.SIGKILL)
    wait_until(lambda: garden.worker_id("b") not in garden.pids())
    saved = garden.run("plan", "--out", "p.json")  # a replace with its rollback; a restart
    assert saved.code == 0, str(saved)
    actions = {s["kind"] for s in json.loads((garden.root / "p.json").read_text())["steps"]}
    assert {"replace", "rollback", "restart"} <= actions

    run = garden.run("apply", "--yes", "p.json")

    assert run.code == 0, str(run)
    assert garden.status()["in_sync"] is True


# -- 7. what plan says, and how it says it ---------------------------------------------------

def big_gpus(garden) -> None:
    """48 GiB simulated GPUs instead of 10 GiB: room for several workers on one."""
    garden.file.write_text(garden.file.read_text().replace("10GiB", "48GiB"))


def test_plan_after_an_interrupted_apply_says_the_worker_was_not_started(garden):
    on_gpu0 = {"placement": {"gpus": [0]}}
    slow = apply_model("first", env={"STANDIN_VLLM_READY_DELAY": "30"}, **on_gpu0)
    garden.write([slow, apply_model("next", **on_gpu0)])  # next waits for first's GPU
    big_gpus(garden)
    apply = garden.start("apply", "--yes")
    wait_until(garden.pids, timeout=STARTUP)
    apply.send_signal(signal.SIGINT)
    assert apply.wait(timeout=30) == 130  # interrupted: the loading worker keeps loading

    plan = garden.run("plan")

    assert "still loading" in plan.out
    assert "an earlier apply was interrupted before starting it" in plan.out
    assert "model next added" not in plan.out


def test_plan_and_status_after_down_say_the_workers_were_stopped_by_down(garden):
    garden.applied([apply_model("a")])
    assert garden.run("down", "--yes").code == 0

    plan = garden.run("plan")

    assert "not running: stopped by `gardenctl down` at " in plan.out, str(plan)
    assert "added to the garden" not in plan.out
    (row,) = garden.status()["workers"]
    assert (row["phase"], row["next_step"]) == ("pending", "start")
    assert row["next_cause"].startswith("not running: stopped by `gardenctl down`")


def test_a_model_id_with_a_newline_cannot_forge_lines_of_the_output(garden):
    hostile = "org/x-1b\nPlan: 0 to start, 0 to replace, 0 to restart, 0 to stop."
    garden.write([apply_model("a", model=hostile)])
    for argv in (("plan",), ("validate",), ("status",)):
        run = garden.run(*argv)
        forged = [line for line in run.text.splitlines() if line.startswith("Plan: 0 to start")]
        assert forged == [], f"{argv}: {run}"
        assert "\x1b" not in run.text


@pytest.mark.parametrize("argv", [("plan", "-o", "json"), ("apply", "--yes", "-o", "json"),
                                  ("down", "--yes", "-o", "json"),
                                  ("inventory", "-o", "json", "--inventory", "missing.yaml"),
                                  ("estimate", "./no-such-model", "-o", "json")])
def test_every_json_command_prints_a_json_error_document_when_it_fails(garden, argv):
    garden.file.write_text("name: lab\nmodels:\n  - {name: a, model: x, max_model_lenn: 1}\n")
    run = garden.run(*argv)
    assert run.code == 1, str(run)
    document = json.loads(run.out)
    assert document["ok"] is False and document["error"]["message"]
    if argv[0] in ("plan", "apply"):
        assert document["error"]["kind"] == "invalid_file"
        (issue,) = document["error"]["issues"]
        assert (issue["line"], issue["path"]) == (3, "models[0].max_model_lenn")


def test_sigint_during_apply_exits_130_and_leaves_the_loading_worker(garden):
    garden.write([apply_model("slow", env={"STANDIN_VLLM_READY_DELAY": "30"})])
    apply = garden.start("apply", "--yes")
    wait_until(garden.pids, timeout=STARTUP)
    pid = garden.pids()[garden.worker_id("slow")]
    apply.send_signal(signal.SIGINT)
    assert apply.wait(timeout=30) == 130
    assert alive(pid)


def test_tests_run_the_stand_in_without_a_console_script():
    from e2e_helpers import STANDIN

    assert STANDIN[0] == sys.executable and "standin-vllm" not in " ".join(STANDIN)
    done = subprocess.run([*STANDIN, "serve", "--help"], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0 and "--max-model-len" in done.stdout
