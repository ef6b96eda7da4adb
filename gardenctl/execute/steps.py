"""The steps an apply is made of: stop a worker, start one, wait for one still loading.

Each step talks to the runtime and the GPU probe and returns an ActionResult; none decides
anything beyond what its action says.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

from gardenctl.errors import GardenError
from gardenctl.execute.results import (
    EXITED_BEFORE_READY,
    HEALTH_TIMEOUT,
    INSUFFICIENT_FREE,
    INTERRUPTED,
    KILLED_BY_SIGNAL,
    MEMORY_NOT_RELEASED,
    OK,
    READY_OUTCOME,
    SPAWN_FAILED,
    STOP_FAILED,
    ActionResult,
)
from gardenctl.plan.model import START, Action
from gardenctl.runtime import base
from gardenctl.spec.models import env_reference
from gardenctl.units import format_size
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
    clock: Callable[[], float]
    sleep: Callable[[float], None]
    wall: Callable[[], float]
    poll_interval: float
    release_timeout: float
    stop_event: threading.Event
    lock: threading.Lock = field(default_factory=threading.Lock)


def resolve_env(worker: DesiredWorker, environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
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


def stop_worker(ctx: Context, action: Action) -> ActionResult:
    started = ctx.clock()
    previous = action.previous
    assert previous is not None
    ctx.progress.update(action.worker_id, "stopping", "", 0.0)
    try:
        result = ctx.runtime.stop(action.worker_id)  # also ends what a dead worker left behind
        released = _wait_released(ctx, previous.node, previous.gpus, set(result.pids))
    except GardenError as exc:
        return ActionResult(action.worker_id, action.action, False, STOP_FAILED, str(exc),
                            ctx.clock() - started)
    elapsed = ctx.clock() - started
    if released is not None:
        return ActionResult(action.worker_id, action.action, False, MEMORY_NOT_RELEASED,
                            released, elapsed,
                            hint="a process of the worker still holds GPU memory; check "
                            "`gardenctl inventory`")
    if result.outcome == "gone":
        ctx.progress.update(action.worker_id, "stopped", "already exited", elapsed)
        return ActionResult(action.worker_id, action.action, True, OK,
                            "already exited; record removed", elapsed)
    ctx.progress.update(action.worker_id, "stopped", result.detail, elapsed)
    return ActionResult(action.worker_id, action.action, True, OK,
                        f"stopped ({result.detail or result.outcome})", elapsed)


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


def gpu_keys(action: Action) -> set[tuple[str, int]]:
    return {(action.node, index) for index in action.gpus}


def restart_count(action: Action) -> int:
    """How many times the worker has been started again after crashing (replace resets it)."""
    previous = action.previous
    if action.action == START and previous is not None and not previous.running:
        return previous.restarts + 1
    return 0


def start_worker(ctx: Context, action: Action, env: dict[str, str]) -> ActionResult:
    worker = action.worker
    assert worker is not None
    started = ctx.clock()
    previous = action.previous
    if previous is not None and not previous.running:
        # A crashed worker's EngineCore or TP processes may survive it, holding GPU memory.
        try:
            leftovers = ctx.runtime.stop(worker.worker_id)
            held = _wait_released(ctx, worker.node, previous.gpus, set(leftovers.pids))
        except GardenError as exc:
            held = str(exc)
        if held:
            return ActionResult(worker.worker_id, action.action, False, MEMORY_NOT_RELEASED,
                                f"what its previous run left behind still holds GPU memory: "
                                f"{held}")
    try:
        short = _wait_free_memory(ctx, worker)
    except GardenError as exc:
        short = str(exc)
    if short:
        return ActionResult(worker.worker_id, action.action, False, INSUFFICIENT_FREE, short,
                            hint="another process holds GPU memory the plan counted on; see "
                            "`gardenctl inventory`, then run plan again")
    ctx.progress.update(worker.worker_id, "spawning", "", 0.0)
    try:
        ctx.runtime.spawn(worker, env, restart_count(action))
    except base.SpawnError as exc:
        return ActionResult(worker.worker_id, action.action, False, SPAWN_FAILED, str(exc),
                            cause=exc.kind)
    return _wait_ready(ctx, action, started, ctx.clock)


def await_loading(ctx: Context, action: Action) -> ActionResult:
    """Wait for a worker spawned by an earlier run, timing it from when it really started."""
    previous = action.previous
    assert previous is not None
    began = previous.started_at if previous.started_at is not None else ctx.wall()
    return _wait_ready(ctx, action, began, ctx.wall)


def _wait_ready(ctx: Context, action: Action, began: float,
                now: Callable[[], float]) -> ActionResult:
    """Poll until ready, exited or past the start timeout (elapsed = now() - began)."""
    worker = action.worker
    assert worker is not None
    last = ""
    while True:
        status = ctx.runtime.check(worker.worker_id)
        elapsed = now() - began
        if status.phase == base.READY:
            ctx.progress.update(worker.worker_id, "ready", "", elapsed)
            return ActionResult(worker.worker_id, action.action, True, READY_OUTCOME,
                                f"ready after {elapsed:.1f}s", elapsed)
        if status.phase == base.EXITED:
            ctx.progress.update(worker.worker_id, "failed", status.detail, elapsed)
            return _exited(worker, action, status, elapsed)
        last = status.detail or last
        ctx.progress.update(worker.worker_id, "starting", status.detail, elapsed)
        if elapsed > worker.start_timeout:
            ctx.runtime.stop(worker.worker_id)
            ctx.progress.update(worker.worker_id, "failed", "health check timed out", elapsed)
            return ActionResult(worker.worker_id, action.action, False, HEALTH_TIMEOUT,
                                f"not ready within its start timeout of {worker.start_timeout:.0f}s"
                                + (f" (last: {last})" if last else "") + "; stopped it", elapsed,
                                hint="raise start_timeout for large models, or read its log "
                                f"(gardenctl logs {worker.worker_id})")
        if ctx.stop_event.is_set():
            return ActionResult(worker.worker_id, action.action, True, INTERRUPTED,
                                "still loading; left running (the next pass checks it)", elapsed)
        ctx.sleep(ctx.poll_interval)


def _exited(worker: DesiredWorker, action: Action, status: base.WorkerStatus,
            elapsed: float) -> ActionResult:
    diagnosis = status.diagnosis
    if status.signal is not None:
        return ActionResult(worker.worker_id, action.action, False, KILLED_BY_SIGNAL,
                            f"killed by signal {status.signal} before it was ready", elapsed,
                            log_tail=status.log_tail)
    code = "?" if status.exit_code is None else status.exit_code
    message = f"exited with code {code} before it was ready"
    if diagnosis is not None:
        message += f": {diagnosis.message}"
    return ActionResult(worker.worker_id, action.action, False, EXITED_BEFORE_READY, message,
                        elapsed, hint=diagnosis.hint if diagnosis else "",
                        log_tail=status.log_tail, cause=diagnosis.cause if diagnosis else None,
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
