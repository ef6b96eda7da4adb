"""execute(plan, runtime) -> ApplyReport: carry out a plan's actions, deciding nothing.

1. Secrets are resolved first; a worker whose secret is missing is left as it is (a replace does
   not stop the running version).
2. The steps (wait for workers still loading, stops, starts) run as gardenctl.execute.schedule
   orders them from vLLM's rules: never two starts at once on one GPU, nothing stopping on a GPU
   where a worker is profiling its memory, stops before starts on a GPU, different GPUs in
   parallel. A stop waits until the process group is gone and, with NVML, until its GPUs no
   longer list its processes. Before each spawn the GPU must have the free memory vLLM will
   demand. A worker counts as started only when /health answers 200 and /v1/models lists its
   name, within its start timeout.
3. Keeps write records for adopted workers.
An interrupted apply leaves every spawned worker recorded: the next apply converges.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Mapping

from gardenctl.execute import schedule
from gardenctl.execute.results import (
    EXITED_BEFORE_READY,
    HEALTH_TIMEOUT,
    INSUFFICIENT_FREE,
    INTERRUPTED,
    KILLED_BY_SIGNAL,
    MEMORY_NOT_RELEASED,
    MISSING_SECRET,
    OK,
    READY_OUTCOME,
    RELEASE_TIMEOUT,
    SKIPPED,
    SPAWN_FAILED,
    STOP_FAILED,
    ActionResult,
    ApplyReport,
)
from gardenctl.execute.steps import (
    Context,
    Progress,
    Silent,
    await_loading,
    gpu_keys,
    resolve_env,
    restart_count,
    start_worker,
    stop_worker,
)
from gardenctl.plan.model import KEEP, REPLACE, START, STOP, Action, Plan
from gardenctl.runtime import base

__all__ = [
    "ActionResult", "ApplyReport", "Progress", "execute", "resolve_env", "restart_count",
    "EXITED_BEFORE_READY", "HEALTH_TIMEOUT", "INSUFFICIENT_FREE", "INTERRUPTED",
    "KILLED_BY_SIGNAL", "MEMORY_NOT_RELEASED", "MISSING_SECRET", "OK", "READY_OUTCOME",
    "SKIPPED", "SPAWN_FAILED", "STOP_FAILED",
]


def execute(plan: Plan, runtime: base.Runtime, *, environ: Mapping[str, str],
            probe: base.GpuProbe | None = None, progress: Progress | None = None,
            clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
            poll_interval: float = 0.25, release_timeout: float = RELEASE_TIMEOUT,
            stop_event: threading.Event | None = None,
            wall: Callable[[], float] = time.time,
            on_result: Callable[[ActionResult], None] | None = None) -> ApplyReport:
    """Run the plan's actions; ``on_result`` hears each result as soon as it is known."""
    ctx = Context(runtime, probe, progress or Silent(), clock, sleep, wall, poll_interval,
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
    # A replace left undone keeps its old worker's memory: nothing may start on those GPUs.
    held = {(a.previous.node, index) for a in plan.actions
            if a.worker_id in blocked and a.action == REPLACE and a.previous is not None
            for index in a.previous.gpus}
    for action in plan.actions:
        if action.action in (START, REPLACE) and action.worker_id not in blocked \
                and gpu_keys(action) & held:
            blocked.add(action.worker_id)
            emit(ActionResult(action.worker_id, action.action, False, SKIPPED,
                              "not started: its GPU still holds a worker whose replacement "
                              "could not start (see the missing secret)"))
    steps, actions = _steps(plan, blocked)
    try:
        _run(ctx, steps, actions, envs, emit)
        for action in plan.actions:
            if action.adopts and action.previous is not None and action.worker is not None:
                runtime.adopt(action.previous, action.worker)
                emit(ActionResult(action.worker_id, KEEP, True, OK, "adopted: record written"))
    except KeyboardInterrupt:
        ctx.stop_event.set()
    if ctx.stop_event.is_set():
        report.interrupted = True
    report.results.sort(key=lambda r: r.worker_id)
    return report


def _steps(plan: Plan, blocked: set[str]) -> tuple[list[schedule.Step], dict[str, Action]]:
    """The plan as scheduled steps, in plan order: waits first, then stops, then starts."""
    steps: list[schedule.Step] = []
    actions: dict[str, Action] = {}
    for action in plan.actions:
        if action.loading:
            step = schedule.Step(schedule.AWAIT, action.worker_id, frozenset(gpu_keys(action)))
            steps.append(step)
            actions[step.key] = action
    for action in plan.actions:
        if action.action in (STOP, REPLACE) and action.previous is not None \
                and action.worker_id not in blocked:
            old = {(action.previous.node, index) for index in action.previous.gpus}
            step = schedule.Step(schedule.STOP, action.worker_id, frozenset(old))
            steps.append(step)
            actions[step.key] = action
    for action in plan.actions:
        if action.action in (START, REPLACE) and action.worker_id not in blocked:
            after = f"{schedule.STOP}:{action.worker_id}" if action.action == REPLACE else None
            step = schedule.Step(schedule.START, action.worker_id, frozenset(gpu_keys(action)),
                                 after=after)
            steps.append(step)
            actions[step.key] = action
    return steps, actions


def _run(ctx: Context, steps: list[schedule.Step], actions: dict[str, Action],
         envs: Mapping[str, dict[str, str]], emit: Callable[[ActionResult], None]) -> None:
    scheduler = schedule.Scheduler(list(steps))
    done = threading.Condition()
    threads: list[threading.Thread] = []

    def run(step: schedule.Step) -> None:
        action = actions[step.key]
        try:
            if step.kind == schedule.AWAIT:
                result = await_loading(ctx, action)
            elif step.kind == schedule.STOP:
                result = stop_worker(ctx, action)
            else:
                result = start_worker(ctx, action, envs[action.worker_id])
        except Exception as exc:  # noqa: BLE001 - reported, never lost in a thread
            result = ActionResult(action.worker_id, action.action, False, SPAWN_FAILED,
                                  f"{type(exc).__name__}: {exc}")
        # a replace reports once: its start's result, or its stop's failure
        if not (step.kind == schedule.STOP and action.action == REPLACE and result.ok):
            emit(result)
        with done:
            scheduler.finished(step, result.ok)
            done.notify_all()

    with done:
        while scheduler.pending or not scheduler.idle:
            for step in scheduler.orphaned():
                action = actions[step.key]
                emit(ActionResult(action.worker_id, action.action, False, SKIPPED,
                                  "not started: the old version could not be stopped"))
            if ctx.stop_event.is_set():
                break
            for step in scheduler.next_runnable():
                thread = threading.Thread(target=run, args=(step,), daemon=True,
                                          name=f"{step.kind} {step.worker_id}")
                threads.append(thread)
                thread.start()
            if scheduler.pending or not scheduler.idle:
                done.wait(timeout=ctx.poll_interval)
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.2)
    except KeyboardInterrupt:
        ctx.stop_event.set()
        for thread in threads:
            thread.join()
        raise
    for step in scheduler.pending:
        action = actions[step.key]
        emit(ActionResult(action.worker_id, action.action, True, INTERRUPTED,
                          f"not {'started' if step.kind == schedule.START else 'done'}: "
                          "interrupted before its turn"))


def _emitter(report: ApplyReport,
             listener: Callable[[ActionResult], None] | None) -> Callable[[ActionResult], None]:
    lock = threading.Lock()

    def emit(result: ActionResult) -> None:
        with lock:
            report.results.append(result)
        if listener is not None:
            listener(result)

    return emit
