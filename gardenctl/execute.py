"""execute(plan, runtime) -> ApplyReport: carry out a plan's actions, deciding nothing.

The order follows vLLM's rules (shared/VLLM.md, checked against vLLM 0.32):
1. Secrets are resolved first; a worker whose secret is missing is left as it is (a replace
   does not stop the running version).
2. Stops (and the old halves of replaces) run in parallel; each waits until the process group is
   gone and, where NVML is available, until its GPUs no longer list its processes.
3. Starts: never two at once on one GPU (vLLM's memory profiling reads device-wide free memory),
   different GPUs in parallel. Before each spawn the GPU must have the free memory vLLM will
   demand (utilization x total). A worker counts as started only when /health answers 200 and
   /v1/models lists its name, within its start timeout.
4. Keeps write records for adopted workers; stops of already exited workers drop their records.
An interrupted apply leaves every spawned worker recorded: the next apply converges.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

from gardenctl.errors import GardenError
from gardenctl.observe import STARTING as STARTING_PHASE
from gardenctl.plan.model import KEEP, REPLACE, START, STOP, Action, Plan
from gardenctl.runtime import base
from gardenctl.spec.models import env_reference
from gardenctl.units import format_size
from gardenctl.workers import DesiredWorker

RELEASE_TIMEOUT = 120.0  # seconds to wait for a stopped worker's GPU memory to come back

# ActionResult.outcome
OK = "ok"
READY_OUTCOME = "ready"
EXITED_BEFORE_READY = "exited_before_ready"
KILLED_BY_SIGNAL = "killed_by_signal"
HEALTH_TIMEOUT = "health_check_timed_out"
SPAWN_FAILED = "spawn_failed"
MISSING_SECRET = "missing_secret"
INSUFFICIENT_FREE = "insufficient_free_memory"
MEMORY_NOT_RELEASED = "memory_not_released"
STOP_FAILED = "stop_failed"
SKIPPED = "skipped"
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class ActionResult:
    worker_id: str
    action: str
    ok: bool
    outcome: str
    message: str
    elapsed: float = 0.0
    hint: str = ""
    log_tail: str = ""
    cause: str | None = None  # recognised failure cause (diagnose)
    suggested_max_model_len: int | None = None

    def to_json(self) -> dict:
        return {
            "worker": self.worker_id, "action": self.action, "ok": self.ok,
            "outcome": self.outcome, "message": self.message, "elapsed_s": round(self.elapsed, 3),
            "hint": self.hint, "cause": self.cause,
            "suggested_max_model_len": self.suggested_max_model_len, "log_tail": self.log_tail,
        }


@dataclass
class ApplyReport:
    results: list[ActionResult] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(r.ok for r in self.results)

    def failed(self) -> list[ActionResult]:
        return [r for r in self.results if not r.ok]


class Progress(Protocol):
    def update(self, worker_id: str, phase: str, detail: str, elapsed: float) -> None: ...


class _Silent:
    def update(self, worker_id: str, phase: str, detail: str, elapsed: float) -> None:
        pass


@dataclass
class _Context:
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


def execute(plan: Plan, runtime: base.Runtime, *, environ: Mapping[str, str],
            probe: base.GpuProbe | None = None, progress: Progress | None = None,
            clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
            poll_interval: float = 0.25, release_timeout: float = RELEASE_TIMEOUT,
            stop_event: threading.Event | None = None,
            wall: Callable[[], float] = time.time,
            on_result: Callable[[ActionResult], None] | None = None) -> ApplyReport:
    """Run the plan's actions; ``on_result`` hears each result as soon as it is known."""
    ctx = _Context(runtime, probe, progress or _Silent(), clock, sleep, wall, poll_interval,
                   release_timeout, stop_event or threading.Event())
    report = ApplyReport()
    emit = _emitter(report, on_result)
    envs: dict[str, dict[str, str]] = {}
    blocked: set[str] = set()
    for action in plan.actions:
        if action.action in (START, REPLACE) and action.worker is not None:
            env, missing = resolve_env(action.worker, environ)
            if missing:
                blocked.add(action.worker_id)
                emit(ActionResult(
                    action.worker_id, action.action, False, MISSING_SECRET,
                    f"environment variable(s) {', '.join(sorted(set(missing)))} not set; "
                    "nothing was changed for this worker",
                    hint="export them where gardenctl runs (they are passed to the worker, "
                    "never written down)"))
            envs[action.worker_id] = env

    stops = [a for a in plan.actions if a.action in (STOP, REPLACE)
             and a.worker_id not in blocked and a.previous is not None]
    stopped_ok: set[str] = set()
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(stops)))) as pool:
            for result in pool.map(lambda a: _stop(ctx, a), stops):
                if result.ok:
                    stopped_ok.add(result.worker_id)
                if result.action == STOP or not result.ok:
                    emit(result)

        starts = [a for a in plan.actions if a.action in (START, REPLACE)
                  and a.worker_id not in blocked
                  and (a.action == START or a.worker_id in stopped_ok)]
        for action in plan.actions:
            if action.action == REPLACE and action.worker_id not in blocked \
                    and action.worker_id not in stopped_ok:
                emit(ActionResult(action.worker_id, action.action, False, SKIPPED,
                                  "not started: the old version could not be stopped"))
        loading = [a for a in plan.actions if a.action == KEEP and a.previous is not None
                   and a.previous.phase == STARTING_PHASE and a.worker is not None]
        _run_starts(ctx, loading + starts, envs, emit)
        for action in plan.actions:
            if action.action == KEEP and action.previous is not None \
                    and not action.previous.has_record and action.previous.running:
                runtime.adopt(action.previous)
                emit(ActionResult(action.worker_id, KEEP, True, OK, "adopted: record written"))
    except KeyboardInterrupt:
        ctx.stop_event.set()
        report.interrupted = True
    if ctx.stop_event.is_set():
        report.interrupted = True
    report.results.sort(key=lambda r: r.worker_id)
    return report


def _emitter(report: ApplyReport,
             listener: Callable[[ActionResult], None] | None) -> Callable[[ActionResult], None]:
    lock = threading.Lock()

    def emit(result: ActionResult) -> None:
        with lock:
            report.results.append(result)
        if listener is not None:
            listener(result)

    return emit


def _stop(ctx: _Context, action: Action) -> ActionResult:
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


def _wait_released(ctx: _Context, node: str, gpus: tuple[int, ...], pids: set[int]) -> str | None:
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


def _run_starts(ctx: _Context, starts: list[Action], envs: Mapping[str, dict[str, str]],
                emit: Callable[[ActionResult], None]) -> None:
    """Start workers in plan order: one at a time per GPU, different GPUs in parallel.
    Workers still loading from an earlier, interrupted run come first: their GPUs stay busy
    until they are ready (vLLM's profiling must not see a neighbour start)."""
    pending = list(starts)
    busy: set[tuple[str, int]] = set()
    done = threading.Condition()
    threads: list[threading.Thread] = []

    def run(action: Action, keys: set[tuple[str, int]]) -> None:
        try:
            if action.action == KEEP:
                result = _await_loading(ctx, action)
            else:
                result = _start(ctx, action, envs[action.worker_id])
        except Exception as exc:  # noqa: BLE001 - reported, never lost in a thread
            result = ActionResult(action.worker_id, action.action, False, SPAWN_FAILED,
                                  f"{type(exc).__name__}: {exc}")
        emit(result)
        with done:
            busy.difference_update(keys)
            done.notify_all()

    with done:
        while pending:
            if ctx.stop_event.is_set():
                break
            ready = next((a for a in pending if not _keys(a) & busy), None)
            if ready is None:
                done.wait(timeout=ctx.poll_interval)
                continue
            pending.remove(ready)
            keys = _keys(ready)
            busy.update(keys)
            thread = threading.Thread(target=run, args=(ready, keys), daemon=True,
                                      name=f"start {ready.worker_id}")
            threads.append(thread)
            thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.2)
    except KeyboardInterrupt:
        ctx.stop_event.set()
        for thread in threads:
            thread.join()
        raise
    for action in pending:
        emit(ActionResult(action.worker_id, action.action, True, INTERRUPTED,
                          "not started: interrupted before its turn"))


def _keys(action: Action) -> set[tuple[str, int]]:
    return {(action.node, index) for index in action.gpus}


def restart_count(action: Action) -> int:
    """How many times the worker has been started again after crashing (replace resets it)."""
    previous = action.previous
    if action.action == START and previous is not None and not previous.running:
        return previous.restarts + 1
    return 0


def _start(ctx: _Context, action: Action, env: dict[str, str]) -> ActionResult:
    worker = action.worker
    assert worker is not None
    started = ctx.clock()
    short = _check_free_memory(ctx, worker)
    if short:
        return ActionResult(worker.worker_id, action.action, False, INSUFFICIENT_FREE, short,
                            hint="another process took GPU memory since the plan was made; "
                            "run plan again")
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
    ctx.progress.update(worker.worker_id, "spawning", "", 0.0)
    try:
        ctx.runtime.spawn(worker, env, restart_count(action))
    except base.SpawnError as exc:
        return ActionResult(worker.worker_id, action.action, False, SPAWN_FAILED, str(exc),
                            cause=exc.kind)
    return _wait_ready(ctx, action, started, ctx.clock)


def _await_loading(ctx: _Context, action: Action) -> ActionResult:
    """Wait for a worker spawned by an earlier run, timing it from when it really started."""
    previous = action.previous
    assert previous is not None
    began = previous.started_at if previous.started_at is not None else ctx.wall()
    return _wait_ready(ctx, action, began, ctx.wall)


def _wait_ready(ctx: _Context, action: Action, began: float,
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


def _check_free_memory(ctx: _Context, worker: DesiredWorker) -> str | None:
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
