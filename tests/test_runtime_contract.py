"""The Runtime contract: the same tests hold for the in-memory fake, for the local runtime
running real stand-in vLLM processes, and for the Ray runtime running them from worker actors on
a real multi-node Ray cluster on this machine (tests marked e2e start real processes)."""

from __future__ import annotations

import socket
import time

import pytest
from builders import garden_text, plan_for
from e2e_helpers import STANDIN

from gardenctl.plan.model import Launch
from gardenctl.runtime import base
from gardenctl.runtime.fake import FakeRuntime
from gardenctl.runtime.local import LocalRuntime
from gardenctl.state import StateDir
from gardenctl.vocab import Cause, Phase


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_worker(env: dict | None = None, args: str = "[]", max_model_len: int = 4096,
                name: str = "m", port: int | None = None, pin: int | None = None,
                liveness: str = ""):
    env_yaml = "{" + ", ".join(f"{k}: '{v}'" for k, v in (env or {}).items()) + "}"
    command = "[" + ", ".join(STANDIN) + "]"
    placement = f", placement: {{gpus: [{pin}]}}" if pin is not None else ""
    text = garden_text(
        f"  - {{name: {name}, model: org/{name}, max_model_len: {max_model_len}, "
        f"port: {port or free_port()}, vllm_command: {command}, args: {args}, "
        f"env: {env_yaml}{placement}{liveness}}}\n")
    return plan_for(text).steps[0].worker


@pytest.fixture(params=["fake", pytest.param("local", marks=pytest.mark.e2e),
                        pytest.param("ray", marks=pytest.mark.e2e)])
def runtime(request, tmp_path):
    if request.param == "fake":
        yield FakeRuntime(node="node-a")
        return
    if request.param == "ray":  # node-a is a node of the test cluster (tests/conftest.py)
        from gardenctl.runtime.ray.runtime import RayRuntime

        real = RayRuntime(request.getfixturevalue("ray_cluster").handle)
    else:
        real = LocalRuntime(StateDir(tmp_path / "state"), node="node-a")
    yield real
    for worker in real.observe(confirm_health=False).workers:
        real.stop(worker.worker_id, grace=2)


def wait_for(runtime, worker_id, phases=(Phase.READY, Phase.FAILED, Phase.CRASHED),
             timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        status = runtime.check(worker_id)
        if status.phase in phases or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def env_of(worker, **extra):
    return {**dict(worker.env), "STANDIN_VLLM_READY_DELAY": "0.2", **extra}


def spawn(runtime, worker, **extra):
    runtime.spawn(worker, env_of(worker, **extra), Launch())


def test_spawned_worker_becomes_ready_and_is_observed_with_its_spec(runtime):
    worker = make_worker()
    spawn(runtime, worker)
    assert runtime.check(worker.worker_id).phase == Phase.STARTING
    assert wait_for(runtime, worker.worker_id).phase == Phase.READY
    (seen,) = runtime.observe().workers
    assert (seen.worker_id, seen.spec_hash, seen.port, seen.phase) == (
        worker.worker_id, worker.spec_hash, worker.port, Phase.READY)
    assert seen.has_record and seen.ever_ready


def test_stopped_worker_is_gone(runtime):
    worker = make_worker()
    spawn(runtime, worker)
    wait_for(runtime, worker.worker_id)
    result = runtime.stop(worker.worker_id, grace=5)
    assert result.outcome == "stopped"
    assert runtime.observe().workers == ()


def test_a_worker_stopped_to_be_restarted_keeps_its_record_with_the_reason(runtime):
    worker = make_worker()
    spawn(runtime, worker)
    wait_for(runtime, worker.worker_id)
    runtime.stop(worker.worker_id, grace=5, keep=Phase.CRASHED, reason="unhealthy: 503",
                 cause=Cause.UNHEALTHY)
    (seen,) = runtime.observe().workers
    assert (seen.phase, seen.last_error, seen.cause) == (Phase.CRASHED, "unhealthy: 503",
                                                         Cause.UNHEALTHY)
    assert not seen.running and seen.pids == ()


def test_worker_that_ignores_sigterm_is_killed(runtime):
    worker = make_worker()
    spawn(runtime, worker, STANDIN_VLLM_IGNORE_SIGTERM="1")
    wait_for(runtime, worker.worker_id)
    assert runtime.stop(worker.worker_id, grace=0.5).outcome == "killed"
    assert runtime.observe().workers == ()


@pytest.mark.parametrize("mode,cause", [("oom", Cause.OUT_OF_MEMORY),
                                        ("kv_cache", Cause.KV_CACHE_TOO_SMALL)])
def test_failed_start_exits_with_a_recognised_cause(runtime, mode, cause):
    worker = make_worker()
    spawn(runtime, worker, STANDIN_VLLM_FAIL=mode)
    status = wait_for(runtime, worker.worker_id)
    assert status.phase == Phase.FAILED and status.exit_code == 1
    assert status.diagnosis.cause == cause
    if cause == Cause.KV_CACHE_TOO_SMALL:
        assert status.diagnosis.suggested_max_model_len < 4096
    (seen,) = runtime.observe().workers
    assert seen.phase == Phase.FAILED and seen.last_error and seen.cause == cause
    assert seen.exited_at is not None and not seen.ever_ready


def test_unknown_vllm_flag_fails_like_the_real_parser(runtime):
    worker = make_worker(args="[--no-such-flag]")
    spawn(runtime, worker)
    status = wait_for(runtime, worker.worker_id)
    assert status.phase == Phase.FAILED and status.exit_code == 2
    assert status.diagnosis.cause == Cause.UNRECOGNISED_FLAG


def test_hanging_worker_stays_starting(runtime):
    worker = make_worker()
    spawn(runtime, worker, STANDIN_VLLM_FAIL="hang")
    time.sleep(0.5)
    assert runtime.check(worker.worker_id).phase == Phase.STARTING


def test_worker_crashing_after_ready_is_observed_crashed(runtime):
    worker = make_worker()
    spawn(runtime, worker, STANDIN_VLLM_FAIL="crash_after_ready", STANDIN_VLLM_CRASH_AFTER="0.3")
    assert wait_for(runtime, worker.worker_id).phase == Phase.READY
    time.sleep(0.8)
    (seen,) = runtime.observe().workers
    assert seen.phase == Phase.CRASHED and seen.cause == Cause.ENGINE_DEAD


def test_engine_dead_behind_a_live_api_server_is_observed_unhealthy(runtime):
    worker = make_worker(liveness=", liveness: {failure_threshold: 2}")
    spawn(runtime, worker, STANDIN_VLLM_FAIL="crash_after_ready", STANDIN_VLLM_CRASH_AFTER="0.2",
          VLLM_KEEP_ALIVE_ON_ENGINE_DEATH="1")
    assert wait_for(runtime, worker.worker_id).phase == Phase.READY
    deadline = time.monotonic() + 5
    while runtime.probe_health(worker.worker_id) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runtime.probe_health(worker.worker_id) == "/health answered 503"
    assert runtime.dead_workers() == set()  # its process lives on: only a probe can tell

    (seen,) = runtime.observe().workers

    assert seen.phase == Phase.UNHEALTHY and seen.running
    assert seen.health == "/health answered 503 (2 probes in a row)"
    assert runtime.observe(confirm_health=False).workers[0].phase == Phase.UNHEALTHY


def test_a_ready_worker_is_not_observed_unhealthy_without_confirming(runtime):
    worker = make_worker()
    spawn(runtime, worker, STANDIN_VLLM_FAIL="crash_after_ready", STANDIN_VLLM_CRASH_AFTER="0.2",
          VLLM_KEEP_ALIVE_ON_ENGINE_DEATH="1")
    assert wait_for(runtime, worker.worker_id).phase == Phase.READY
    time.sleep(0.5)
    assert runtime.observe(confirm_health=False).workers[0].phase == Phase.READY
    runtime.mark_unhealthy(worker.worker_id, "/health answered 503 (3 probes in a row)")
    (seen,) = runtime.observe(confirm_health=False).workers
    assert (seen.phase, seen.cause) == (Phase.UNHEALTHY, Cause.UNHEALTHY)


def test_port_taken_by_another_worker_is_refused_at_spawn_and_recorded(runtime):
    first = make_worker(name="a")
    spawn(runtime, first)
    wait_for(runtime, first.worker_id)
    second = make_worker(name="b", port=first.port)
    with pytest.raises(base.SpawnError) as caught:
        spawn(runtime, second)
    assert caught.value.cause == Cause.PORT_IN_USE
    seen = {w.worker_id: w for w in runtime.observe().workers}[second.worker_id]
    assert (seen.phase, seen.cause, seen.pid) == (Phase.FAILED, Cause.PORT_IN_USE, None)


def test_nothing_starts_on_a_gpu_while_another_worker_loads_there(runtime):
    loading = make_worker(name="a", pin=0)
    spawn(runtime, loading, STANDIN_VLLM_FAIL="hang")
    neighbour = make_worker(name="b", pin=0)
    elsewhere = make_worker(name="c", pin=1)

    with pytest.raises(base.GpuBusy, match="a/0 is loading"):
        spawn(runtime, neighbour)
    spawn(runtime, elsewhere)  # another GPU: in parallel

    assert {w.worker_id for w in runtime.observe().workers} == {loading.worker_id,
                                                                elsewhere.worker_id}
    runtime.stop(loading.worker_id, grace=2)
    spawn(runtime, neighbour)


def test_dead_workers_lists_a_worker_whose_process_died(runtime):
    worker = make_worker()
    spawn(runtime, worker, STANDIN_VLLM_FAIL="crash_after_ready", STANDIN_VLLM_CRASH_AFTER="0.2")
    assert wait_for(runtime, worker.worker_id, phases=(Phase.READY,)).phase == Phase.READY
    assert runtime.dead_workers() == set()
    deadline = time.monotonic() + 5
    while not runtime.dead_workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {w for w, _ in runtime.dead_workers()} == {worker.worker_id}


def test_a_restart_keeps_the_history_of_the_runs_before(runtime):
    worker = make_worker()
    spawn(runtime, worker, STANDIN_VLLM_FAIL="oom")
    wait_for(runtime, worker.worker_id)
    runtime.spawn(worker, env_of(worker), Launch(restarts=1, streak=1))
    assert wait_for(runtime, worker.worker_id).phase == Phase.READY
    (seen,) = runtime.observe().workers
    assert (seen.restarts, seen.streak, seen.cause) == (1, 1, Cause.OUT_OF_MEMORY)


@pytest.mark.e2e
def test_a_reused_pid_is_never_signalled(tmp_path):
    import subprocess
    import sys

    from gardenctl.runtime.processes import identity_of
    from gardenctl.state import WorkerRecord

    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                start_new_session=True)
    try:
        runtime = LocalRuntime(StateDir(tmp_path / "state"), node="node-a")
        worker = make_worker()
        now = identity_of(stranger.pid)
        # a record whose worker died long ago, and whose pid the kernel gave to the stranger
        record = WorkerRecord(spec=worker, phase=Phase.READY, pid=stranger.pid,
                              pgid=stranger.pid, create_time=now.create_time - 100,
                              start_ticks=now.start_ticks - 10_000, started_at=1.0)
        runtime.state.write_record(record)
        assert runtime.dead_workers() == {(worker.worker_id, stranger.pid)}
        assert runtime.stop(worker.worker_id).outcome == "gone"
        assert stranger.poll() is None  # still alive: never signalled
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.e2e
def test_an_adopted_worker_is_recorded_as_the_garden_wants_it(tmp_path):
    runtime = LocalRuntime(StateDir(tmp_path / "state"), node="node-a",
                           environ={"LAB_KEY": "k-123"})
    worker = make_worker({"VLLM_API_KEY": "${LAB_KEY}"})
    runtime.spawn(worker, {**env_of(worker), "VLLM_API_KEY": "k-123"}, Launch())
    assert wait_for(runtime, worker.worker_id).phase == Phase.READY
    runtime.state.delete_record(worker.worker_id)  # gardenctl died before writing it
    (orphan,) = runtime.observe().workers
    assert not orphan.has_record and orphan.phase == Phase.UNKNOWN
    runtime.adopt(orphan, worker)
    record = runtime.state.read_record(worker.worker_id)
    assert dict(record.spec.env)["VLLM_API_KEY"] == "${LAB_KEY}"  # the reference, not the value
    assert (record.spec.claim_bytes, record.spec.sizing_hash, record.phase) == (
        worker.claim_bytes, worker.sizing_hash, Phase.READY)
    runtime.stop(worker.worker_id, grace=2)


@pytest.mark.e2e
def test_a_worker_gets_only_allowed_variables_of_the_controller_environment(tmp_path):
    controller = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
                  "HF_HOME": str(tmp_path / "hf"), "NCCL_DEBUG": "INFO",
                  "AWS_SECRET_ACCESS_KEY": "leaked?", "DATABASE_URL": "postgres://x",
                  "CUDA_VISIBLE_DEVICES": "7", "VLLM_PORT": "9999", "VLLM_API_KEY": "shell-key",
                  "GARDENCTL_STATE_DIR": "/elsewhere"}
    runtime = LocalRuntime(StateDir(tmp_path / "state"), node="node-a", environ=controller)
    worker = make_worker({"MY_SETTING": "on"})
    spawn(runtime, worker)
    assert wait_for(runtime, worker.worker_id).phase == Phase.READY
    import psutil

    record = runtime.state.read_record(worker.worker_id)
    env = psutil.Process(record.pid).environ()
    assert {k: env.get(k) for k in ("PATH", "HOME", "LANG", "HF_HOME", "NCCL_DEBUG",
                                    "MY_SETTING")} == {
        "PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
        "HF_HOME": str(tmp_path / "hf"), "NCCL_DEBUG": "INFO", "MY_SETTING": "on"}
    for name in ("AWS_SECRET_ACCESS_KEY", "DATABASE_URL", "VLLM_PORT", "VLLM_API_KEY",
                 "GARDENCTL_STATE_DIR"):
        assert name not in env, name
    assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, worker.gpus))  # the plan's GPUs
    runtime.stop(worker.worker_id, grace=2)


@pytest.mark.e2e
def test_a_runtime_updates_and_watches_only_the_gardens_it_holds(tmp_path):
    state = StateDir(tmp_path / "state")
    owner = LocalRuntime(state, node="node-a", gardens={"lab"})
    neighbour = LocalRuntime(state, node="node-a", gardens={"other"})
    worker = make_worker()  # of garden lab
    spawn(owner, worker, STANDIN_VLLM_FAIL="crash_after_ready", STANDIN_VLLM_CRASH_AFTER="0.2")
    try:
        assert wait_for(owner, worker.worker_id, phases=(Phase.READY,)).phase == Phase.READY
        deadline = time.monotonic() + 5
        while not owner.dead_workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {w for w, _ in owner.dead_workers()} == {worker.worker_id}
        assert neighbour.dead_workers() == set()  # not its garden: not its deaths to act on
        (seen,) = neighbour.observe().workers
        assert seen.phase == Phase.CRASHED  # it sees the death...
        assert state.read_record(worker.worker_id).phase == Phase.READY  # ...writes nothing
        (seen,) = owner.observe().workers
        assert state.read_record(worker.worker_id).phase == Phase.CRASHED
    finally:
        owner.stop(worker.worker_id, grace=2)
