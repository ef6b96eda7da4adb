"""The Runtime contract: the same tests hold for the in-memory fake and for the local runtime
running real stand-in vLLM processes (tests marked e2e start real processes)."""

from __future__ import annotations

import socket
import time

import pytest
from builders import garden_text, plan_for

from gardenctl.runtime import base
from gardenctl.runtime.diagnose import KV_CACHE_TOO_SMALL, OOM, UNRECOGNISED_FLAG
from gardenctl.runtime.fake import FakeRuntime
from gardenctl.runtime.local import LocalRuntime
from gardenctl.state import StateDir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_worker(env: dict | None = None, args: str = "[]", max_model_len: int = 4096,
                name: str = "m", port: int | None = None):
    env_yaml = "{" + ", ".join(f"{k}: '{v}'" for k, v in (env or {}).items()) + "}"
    text = garden_text(
        f"  - {{name: {name}, model: org/{name}, max_model_len: {max_model_len}, "
        f"port: {port or free_port()}, vllm_command: [standin-vllm], args: {args}, "
        f"env: {env_yaml}}}\n")
    return plan_for(text).actions[0].worker


@pytest.fixture(params=["fake", pytest.param("local", marks=pytest.mark.e2e)])
def runtime(request, tmp_path):
    if request.param == "fake":
        yield FakeRuntime(node="node-a")
        return
    local = LocalRuntime(StateDir(tmp_path / "state"), node="node-a")
    yield local
    for worker in local.observe().workers:
        local.stop(worker.worker_id, grace=2)


def wait_for(runtime, worker_id, phases=(base.READY, base.EXITED), timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        status = runtime.check(worker_id)
        if status.phase in phases or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def env_of(worker, **extra):
    return {**dict(worker.env), "STANDIN_VLLM_READY_DELAY": "0.2", **extra}


def test_spawned_worker_becomes_ready_and_is_observed_with_its_spec(runtime):
    worker = make_worker({"STANDIN_VLLM_READY_DELAY": "0.2"})
    runtime.spawn(worker, env_of(worker))
    assert runtime.check(worker.worker_id).phase == base.STARTING
    assert wait_for(runtime, worker.worker_id).phase == base.READY
    (seen,) = runtime.observe().workers
    assert (seen.worker_id, seen.spec_hash, seen.port, seen.phase) == (
        worker.worker_id, worker.spec_hash, worker.port, "ready")
    assert seen.has_record


def test_stopped_worker_is_gone(runtime):
    worker = make_worker()
    runtime.spawn(worker, env_of(worker))
    wait_for(runtime, worker.worker_id)
    result = runtime.stop(worker.worker_id, grace=5)
    assert result.outcome == "stopped"
    assert runtime.observe().workers == ()


def test_worker_that_ignores_sigterm_is_killed(runtime):
    worker = make_worker()
    runtime.spawn(worker, env_of(worker, STANDIN_VLLM_IGNORE_SIGTERM="1"))
    wait_for(runtime, worker.worker_id)
    assert runtime.stop(worker.worker_id, grace=0.5).outcome == "killed"
    assert runtime.observe().workers == ()


@pytest.mark.parametrize("mode,cause", [("oom", OOM), ("kv_cache", KV_CACHE_TOO_SMALL)])
def test_failed_start_exits_with_a_recognised_cause(runtime, mode, cause):
    worker = make_worker()
    runtime.spawn(worker, env_of(worker, STANDIN_VLLM_FAIL=mode))
    status = wait_for(runtime, worker.worker_id)
    assert status.phase == base.EXITED and status.exit_code == 1
    assert status.diagnosis.cause == cause
    if cause == KV_CACHE_TOO_SMALL:
        assert status.diagnosis.suggested_max_model_len < 4096
    (seen,) = runtime.observe().workers
    assert seen.phase == "crashed" and seen.last_error


def test_unknown_vllm_flag_fails_like_the_real_parser(runtime):
    worker = make_worker(args="[--no-such-flag]")
    runtime.spawn(worker, env_of(worker))
    status = wait_for(runtime, worker.worker_id)
    assert status.phase == base.EXITED and status.exit_code == 2
    assert status.diagnosis.cause == UNRECOGNISED_FLAG


def test_hanging_worker_stays_starting(runtime):
    worker = make_worker()
    runtime.spawn(worker, env_of(worker, STANDIN_VLLM_FAIL="hang"))
    time.sleep(0.5)
    assert runtime.check(worker.worker_id).phase == base.STARTING


def test_worker_crashing_after_ready_is_observed_crashed(runtime):
    worker = make_worker()
    runtime.spawn(worker, env_of(worker, STANDIN_VLLM_FAIL="crash_after_ready",
                                 STANDIN_VLLM_CRASH_AFTER="0.3"))
    assert wait_for(runtime, worker.worker_id).phase == base.READY
    time.sleep(0.8)
    (seen,) = runtime.observe().workers
    assert seen.phase == "crashed"


def test_port_taken_by_another_worker_is_refused_at_spawn(runtime):
    first = make_worker(name="a")
    runtime.spawn(first, env_of(first))
    wait_for(runtime, first.worker_id)
    second = make_worker(name="b", port=first.port)
    with pytest.raises(base.SpawnError) as caught:
        runtime.spawn(second, env_of(second))
    assert caught.value.kind == "port_in_use"


def test_dead_workers_lists_a_worker_whose_process_died(runtime):
    worker = make_worker()
    runtime.spawn(worker, env_of(worker, STANDIN_VLLM_FAIL="crash_after_ready",
                                 STANDIN_VLLM_CRASH_AFTER="0.2"))
    assert wait_for(runtime, worker.worker_id, phases=(base.READY,)).phase == base.READY
    assert runtime.dead_workers() == set()
    deadline = time.monotonic() + 5
    while not runtime.dead_workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {w for w, _ in runtime.dead_workers()} == {worker.worker_id}


@pytest.mark.e2e
def test_a_reused_pid_is_never_signalled(tmp_path):
    import dataclasses
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
        record = WorkerRecord(
            worker_id=worker.worker_id, garden=worker.garden, model=worker.model, replica=0,
            node="node-a", gpus=[0], host="127.0.0.1", port=worker.port,
            served_model_name=worker.served_model_name, utilization=0.1, claim_bytes=1,
            spec_hash=worker.spec_hash, sizing_hash=worker.sizing_hash, argv=list(worker.argv),
            env={}, start_timeout=5, shutdown_timeout=1, pid=stranger.pid, pgid=stranger.pid,
            create_time=now.create_time - 100, start_ticks=now.start_ticks - 10_000,
            phase="ready")
        runtime.state.write_record(dataclasses.replace(record))
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
    runtime.spawn(worker, {**env_of(worker), "VLLM_API_KEY": "k-123"})
    assert wait_for(runtime, worker.worker_id).phase == base.READY
    runtime.state.delete_record(worker.worker_id)  # gardenctl died before writing it
    (orphan,) = runtime.observe().workers
    assert not orphan.has_record
    runtime.adopt(orphan, worker)
    record = runtime.state.read_record(worker.worker_id)
    assert record.env["VLLM_API_KEY"] == "${LAB_KEY}"  # the reference, never the value
    assert (record.claim_bytes, record.sizing_hash, record.phase) == (
        worker.claim_bytes, worker.sizing_hash, "ready")
    runtime.stop(worker.worker_id, grace=2)
