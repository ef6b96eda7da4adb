"""Carrying out one plan step against a runtime and the GPU probe.

Each function does what its step says and returns a StepResult; none decides anything the
step does not say. A spawn either waits until its worker is ready (`apply`: `Context.wait`),
or returns once the process runs (`watch`: later passes observe the load).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from gardenctl.errors import GardenError
from gardenctl.execute.results import StepResult
from gardenctl.observe import Rejection
from gardenctl.plan.model import Launch, Step
from gardenctl.runtime import base
from gardenctl.runtime.sleepmode import SleepModeError
from gardenctl.spec.models import env_reference
from gardenctl.units import format_size
from gardenctl.vocab import Cause, Outcome, Phase, StepKind
from gardenctl.workers import DesiredWorker


class Progress(Protocol):
    def update(self, worker_id: str, phase: str, detail: str, elapsed: float) -> None: ...


class Silent:
    def update(self, worker_id: str, phase: str, detail: str, elapsed: float) -> None:
        pass


@dataclass
class Context:
    runtime: base.Runtime
    probe: base.GpuProbe | None
    progress: Progress
    clock: Callable[[], float]  # monotonic
    sleep: Callable[[float], None]
    wall: Callable[[], float]
    poll_interval: float
    release_timeout: float
    stop_event: threading.Event
    wait: bool = True  # spawns wait for ready (apply), or return once spawned (watch)
    lock: threading.Lock = field(default_factory=threading.Lock)


def resolve_env(worker: DesiredWorker,
                environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The worker's environment with ${NAME} references filled in, and the names missing."""
    resolved, missing = {}, []
    for key, value in worker.env:
        ref = env_reference(value)
        if ref is None:
            resolved[key] = value
        elif ref in environ:
            resolved[key] = environ[ref]
        else:
            missing.append(ref)
    return resolved, missing


def _result(step: Step, outcome: Outcome, message: str, elapsed: float = 0.0,
            **extra: object) -> StepResult:
    return StepResult(step.worker_id, step.kind, outcome, message, elapsed, step_id=step.id,
                      **extra)  # type: ignore[arg-type]


# -- stops ---------------------------------------------------------------------------------

def stop_step(ctx: Context, step: Step) -> StepResult:
    """STOP (removal, or an unhealthy / stuck run kept as ended) and STOP_LEFTOVERS."""
    started = ctx.clock()
    busy = _wait_gpus_free(ctx, step)
    if busy is not None:
        return _result(step, Outcome.DEFERRED, f"not stopped: {busy}; it is stopped once the "
                       "GPU is free", ctx.clock() - started)
    ctx.progress.update(step.worker_id, "stopping", "", 0.0)
    stopped = _stop(ctx, step, keep=step.then, reason=step.ends_because or step.cause,
                    cause=_end_cause(step))
    elapsed = ctx.clock() - started
    if isinstance(stopped, StepResult):
        return replace(stopped, elapsed=elapsed)
    ctx.progress.update(step.worker_id, "stopped", stopped.detail, elapsed)
    if stopped.outcome == "gone":
        return _result(step, Outcome.OK, "already exited; record removed" if step.then is None
                       else "already exited", elapsed)
    return _result(step, Outcome.OK, f"stopped ({stopped.detail or stopped.outcome})", elapsed)


def _stop(ctx: Context, step: Step, *, keep: Phase | None, reason: str,
          cause: Cause = Cause.EXITED) -> base.StopResult | StepResult:
    """Stop whatever runs under the step's worker id and wait for its GPU memory to come
    back; what the runtime did, or the failure."""
    previous = step.previous
    try:
        result = ctx.runtime.stop(step.worker_id, keep=keep, reason=reason, cause=cause)
        node, gpus = (previous.node, previous.gpus) if previous else (step.node, step.gpus)
        held = _wait_released(ctx, node, gpus, set(result.pids))
    except GardenError as exc:
        return _result(step, Outcome.STOP_FAILED, str(exc))
    if held is not None:
        return _result(step, Outcome.MEMORY_NOT_RELEASED, held,
                       hint="a process of the worker still holds GPU memory; check "
                       "`gardenctl inventory`")
    return result


def _wait_gpus_free(ctx: Context, step: Step) -> str | None:
    """Before anything starts or stops on the step's GPUs: while another garden's worker
    loads or stops on one of them, wait (apply, up to the start timeout) or give up at once
    (watch tries again later). Why it is still busy, or None. (Spawning checks again, under
    the GPU lock.)"""
    deadline = ctx.clock() + step.spec.start_timeout
    while True:
        busy = None
        for node in sorted({node for node, _ in step.gpu_keys}):
            gpus = sorted(index for key_node, index in step.gpu_keys if key_node == node)
            busy = busy or ctx.runtime.gpus_busy(step.worker_id, node, gpus)
        if busy is None or not ctx.wait or ctx.clock() >= deadline or ctx.stop_event.is_set():
            return busy
        ctx.progress.update(step.worker_id, "waiting", busy, 0.0)
        ctx.sleep(ctx.poll_interval)


def _end_cause(step: Step) -> Cause:
    """Why the run a step ends is over, in the vocabulary of causes."""
    previous = step.previous
    if previous is not None and previous.phase == Phase.UNHEALTHY:
        return Cause.UNHEALTHY
    if previous is not None and previous.phase == Phase.STARTING:
        return Cause.START_TIMEOUT
    return previous.cause if previous is not None and previous.cause else Cause.EXITED


def _wait_released(ctx: Context, node: str, gpus: tuple[int, ...], pids: set[int]) -> str | None:
    """None once no GPU of the worker lists its processes; a message after the timeout."""
    if ctx.probe is None or not pids:
        return None
    deadline = ctx.clock() + ctx.release_timeout
    while True:
        holding = {index: ctx.probe.pids_on(node, index) & pids for index in gpus}
        holding = {index: held for index, held in holding.items() if held}
        if not holding:
            return None
        if ctx.clock() >= deadline:
            where = ", ".join(f"GPU {i} (pids {sorted(p)})" for i, p in sorted(holding.items()))
            return f"GPU memory not released after {ctx.release_timeout:.0f}s: {where}"
        ctx.sleep(ctx.poll_interval)


# -- spawns --------------------------------------------------------------------------------

def spawn_step(ctx: Context, step: Step, env: dict[str, str], because: str = "") -> StepResult:
    """START, REPLACE, RESTART, ROLLBACK: stop what runs under the worker's id (if anything),
    make sure its GPUs have room, spawn it, and (apply) wait until it is ready. ``because``:
    for a rollback, why the replacement failed."""
    worker = step.worker
    assert worker is not None and step.launch is not None
    launch = step.launch
    if step.kind == StepKind.ROLLBACK and launch.rejected is not None:
        rejected = launch.rejected  # the plan leaves its time (and a conditional one's reason)
        launch = replace(launch, rejected=Rejection(rejected.spec_hash, because or rejected.reason,
                                                    ctx.wall()))
    started = ctx.clock()
    busy = _wait_gpus_free(ctx, step)
    if busy is not None:
        return _result(step, Outcome.DEFERRED, f"not started: {busy}; it starts once the GPU "
                       "is free (nothing was changed)", ctx.clock() - started)
    if step.previous is not None and (step.previous.running or step.previous.pids):
        ctx.progress.update(worker.worker_id, "stopping", "", 0.0)
        keep = Phase.CRASHED if step.previous.ever_ready else Phase.FAILED
        stopped = _stop(ctx, step, keep=keep, reason=step.ends_because or step.cause,
                        cause=_end_cause(step))
        if isinstance(stopped, StepResult):
            return replace(stopped, elapsed=ctx.clock() - started)
    _sleep_neighbours(ctx, worker)
    short = _wait_free_memory(ctx, worker)
    if short:
        ctx.runtime.fail(worker, launch, short, Cause.FREE_MEMORY_CHECK)
        return _result(step, Outcome.INSUFFICIENT_FREE, short, ctx.clock() - started,
                       hint="another process holds GPU memory the plan counted on; see "
                       "`gardenctl inventory`, then run plan again")
    ctx.progress.update(worker.worker_id, "spawning", "", 0.0)
    try:
        _spawn_when_gpu_free(ctx, worker, env, launch)
    except base.GpuBusy as exc:
        return _result(step, Outcome.DEFERRED, f"not started: {exc}; it starts once the GPU "
                       "is free", ctx.clock() - started)
    except base.SpawnError as exc:
        return _result(step, Outcome.SPAWN_FAILED, str(exc), ctx.clock() - started,
                       cause=exc.cause, hint=exc.hint)
    if not ctx.wait:
        return _result(step, Outcome.SPAWNED, "spawned; loading", ctx.clock() - started)
    return _wait_ready(ctx, step, worker, started, ctx.clock)


def _sleep_neighbours(ctx: Context, worker: DesiredWorker) -> None:
    """A standby worker starts awake, in its GPUs' wake slot: the plan counts on the other
    standby workers there being asleep then, so any the gateway woke are put to sleep first
    (once their requests in flight are done)."""
    if worker.standby is None:
        return
    if not worker.standby.sleeps and _check_free_memory(ctx, worker) is None:
        return  # a stop-mode start was asked for by the gateway, which made room for it
    mine = set(worker.gpus)
    for other in ctx.runtime.observe(confirm_health=False).workers:
        spec = other.spec
        if (spec.standby is None or not spec.standby.sleeps or other.worker_id == worker.worker_id
                or other.phase != Phase.READY or spec.node != worker.node
                or not mine & set(spec.gpus)):
            continue
        if ctx.runtime.is_sleeping(other.worker_id) is False:
            ctx.progress.update(worker.worker_id, "waiting",
                                f"putting {other.worker_id} to sleep to make room", 0.0)
            try:
                ctx.runtime.put_to_sleep(other.worker_id)
            except SleepModeError:
                pass  # the free-memory check that follows says whether there is room


def _spawn_when_gpu_free(ctx: Context, worker: DesiredWorker, env: dict[str, str],
                         launch: Launch) -> None:
    """Spawn; while another garden's worker loads on the GPU, wait (apply) up to the start
    timeout, or give up at once (watch tries again on its next pass)."""
    deadline = ctx.clock() + worker.start_timeout
    while True:
        try:
            ctx.runtime.spawn(worker, env, launch)
            return
        except base.GpuBusy as exc:
            if not ctx.wait or ctx.clock() >= deadline or ctx.stop_event.is_set():
                raise
            ctx.progress.update(worker.worker_id, "waiting", str(exc), 0.0)
            ctx.sleep(ctx.poll_interval)


def await_step(ctx: Context, step: Step) -> StepResult:
    """Wait for a worker spawned by an earlier run, timing it from when it really started."""
    worker = step.spec
    assert step.previous is not None
    began = step.previous.started_at if step.previous.started_at is not None else ctx.wall()
    return _wait_ready(ctx, step, worker, began, ctx.wall)


def adopt_step(ctx: Context, step: Step) -> StepResult:
    assert step.previous is not None and step.worker is not None
    ctx.runtime.adopt(step.previous, step.worker)
    return _result(step, Outcome.OK, "adopted: record written")


def _wait_ready(ctx: Context, step: Step, worker: DesiredWorker, began: float,
                now: Callable[[], float]) -> StepResult:
    """Poll until ready, ended or past the start timeout (elapsed = now() - began)."""
    last = ""
    while True:
        status = ctx.runtime.check(worker.worker_id)
        elapsed = now() - began
        if status.phase == Phase.READY:
            ctx.progress.update(worker.worker_id, "ready", "", elapsed)
            # a standby worker's detail says how it settled: "ready, and asleep until ..."
            settled = status.detail.removeprefix("ready")
            return _result(step, Outcome.READY, f"ready after {elapsed:.1f}s{settled}", elapsed)
        if status.ended:
            ctx.progress.update(worker.worker_id, "failed", status.detail, elapsed)
            return _ended(step, status, elapsed)
        last = status.detail or last
        ctx.progress.update(worker.worker_id, "starting", status.detail, elapsed)
        if elapsed > worker.start_timeout:
            message = (f"not ready within its start timeout of {worker.start_timeout:.0f}s"
                       + (f" (last: {last})" if last else ""))
            ctx.runtime.stop(worker.worker_id, keep=Phase.FAILED, reason=message,
                             cause=Cause.START_TIMEOUT)
            ctx.progress.update(worker.worker_id, "failed", "health check timed out", elapsed)
            return _result(step, Outcome.HEALTH_TIMEOUT, message + "; stopped it", elapsed,
                           cause=Cause.START_TIMEOUT,
                           hint="raise start_timeout for large models, or read its log "
                           f"(gardenctl logs {worker.worker_id})")
        if ctx.stop_event.is_set():
            return _result(step, Outcome.INTERRUPTED, "still loading; left running (the next "
                           "apply or watch pass checks it)", elapsed)
        ctx.sleep(ctx.poll_interval)


def _ended(step: Step, status: base.WorkerStatus, elapsed: float) -> StepResult:
    diagnosis = status.diagnosis
    if status.signal is not None:
        return _result(step, Outcome.KILLED_BY_SIGNAL, f"killed by signal {status.signal} "
                       "before it was ready", elapsed, log_tail=status.log_tail,
                       cause=Cause.KILLED_BY_SIGNAL)
    code = "?" if status.exit_code is None else status.exit_code
    message = f"exited with code {code} before it was ready"
    if diagnosis is not None and diagnosis.cause != Cause.UNKNOWN:
        message += f": {diagnosis.message}"
    return _result(step, Outcome.EXITED_BEFORE_READY, message, elapsed,
                   hint=diagnosis.hint if diagnosis else "", log_tail=status.log_tail,
                   cause=diagnosis.cause if diagnosis else Cause.EXITED,
                   suggested_max_model_len=diagnosis.suggested_max_model_len
                   if diagnosis else None)


def _wait_free_memory(ctx: Context, worker: DesiredWorker) -> str | None:
    """Wait (up to the release timeout) until the worker's GPUs have its claim free: memory a
    stopped neighbour held can take a moment to come back, and NVML's process list cannot
    always tell (inside containers it shows host pids)."""
    deadline = ctx.clock() + ctx.release_timeout
    while True:
        short = _check_free_memory(ctx, worker)
        if short is None or ctx.clock() >= deadline or ctx.stop_event.is_set():
            return short
        ctx.progress.update(worker.worker_id, "waiting", "for GPU memory to be free", 0.0)
        ctx.sleep(ctx.poll_interval)


def _check_free_memory(ctx: Context, worker: DesiredWorker) -> str | None:
    """vLLM refuses to start unless, after its own CUDA context, free memory >= utilization x
    total: check the whole claim is free before spawning, instead of a crash loop."""
    if ctx.probe is None:
        return None
    problems = []
    for index in worker.gpus:
        free = ctx.probe.free_bytes(worker.node, index)
        if free < worker.claim_bytes:
            problems.append(f"GPU {index} has {format_size(free)} free; the worker needs "
                            f"{format_size(worker.claim_bytes)} (utilization "
                            f"{worker.utilization:.3f} of the GPU plus its CUDA context)")
    return "; ".join(problems) or None


__all__ = ["Context", "Progress", "Silent", "adopt_step", "await_step", "resolve_env",
           "spawn_step", "stop_step"]
