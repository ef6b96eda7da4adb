"""Carrying out a plan's steps, deciding nothing: a scheduler of steps.

Each step runs in its own thread once what it waits for (`Step.after`, written by the planner)
has finished as it needs; a step that can no longer run is reported as skipped (what it needed
failed) or not needed (a rollback whose replacement succeeded). Two ways to run a plan:

- `Executor.run(plan)` (apply): every step, to the end; spawns wait until their worker is
  ready, so `apply` returns when the garden has converged (or says what failed).
- `Executor.issue(plan)` (watch): only the steps that may begin now; spawns return once their
  process runs. A pass never waits for a load: later passes observe it (`in_flight()` names
  the workers a step is still acting on, so the next plan waits for them instead).

Secrets are resolved here, at the last moment, from the environment gardenctl runs in; they
reach the worker's environment and nothing else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from gardenctl.execute.results import RELEASE_TIMEOUT, ApplyReport, StepResult
from gardenctl.execute.schedule import Dropped, Schedule
from gardenctl.execute.steps import (
    Context,
    Progress,
    Silent,
    adopt_step,
    await_step,
    resolve_env,
    spawn_step,
    stop_step,
)
from gardenctl.plan.model import Plan, Step
from gardenctl.runtime import base
from gardenctl.vocab import Outcome, StepKind

__all__ = ["ApplyReport", "Executor", "Progress", "StepResult", "execute", "resolve_env"]

_SUCCEEDED = (Outcome.READY, Outcome.SPAWNED, Outcome.OK)
Listener = Callable[[StepResult], None]


class Executor:
    def __init__(self, runtime: base.Runtime, *, environ: Mapping[str, str],
                 probe: base.GpuProbe | None = None, progress: Progress | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 wall: Callable[[], float] = time.time, poll_interval: float = 0.25,
                 release_timeout: float = RELEASE_TIMEOUT,
                 stop_event: threading.Event | None = None) -> None:
        self.runtime = runtime
        self.environ = environ
        self.stop_event = stop_event or threading.Event()
        self._context = Context(runtime, probe, progress or Silent(), clock, sleep, wall,
                                poll_interval, release_timeout, self.stop_event)
        self._lock = threading.Lock()
        self._in_flight: dict[str, threading.Thread] = {}  # worker id -> the step's thread

    # -- apply: the whole plan ---------------------------------------------------------------

    def run(self, plan: Plan, on_result: Listener | None = None) -> ApplyReport:
        """Run every step of ``plan`` to the end; ``on_result`` hears each result as soon as it
        is known."""
        ctx = self._context
        ctx.wait = True
        report = ApplyReport()
        emit = _emitter(report, on_result)
        for step in plan.steps:
            if step.kind in (StepKind.HOLD, StepKind.WAIT) and not step.conditional:
                emit(StepResult(step.worker_id, step.kind, Outcome.HELD, step.cause,
                                step_id=step.id))
        schedule = Schedule.of(plan.steps)
        results: dict[str, StepResult] = {}
        done = threading.Condition()
        threads: list[threading.Thread] = []

        def work(step: Step) -> None:
            result = self._perform(step, results)
            emit(result)
            with done:
                results[step.id] = result
                if result.outcome == Outcome.DEFERRED:
                    schedule.deferred(step)
                else:
                    schedule.finished(step, result.outcome in _SUCCEEDED)
                done.notify_all()

        try:
            with done:
                while not schedule.done:
                    for dropped in schedule.drop_unreachable():
                        if dropped.skipped:  # a rollback that is not needed goes unsaid
                            emit(_skipped(dropped, results))
                    if self.stop_event.is_set():
                        break
                    for step in schedule.runnable():
                        thread = threading.Thread(target=work, args=(step,), daemon=True,
                                                  name=step.id)
                        threads.append(thread)
                        thread.start()
                    if not schedule.done:
                        done.wait(timeout=ctx.poll_interval)
            _join(threads)
        except KeyboardInterrupt:
            self.stop_event.set()
            _join(threads)
        for step in schedule.pending:
            emit(StepResult(step.worker_id, step.kind, Outcome.INTERRUPTED,
                            "not done: interrupted before its turn", step_id=step.id))
        report.interrupted = self.stop_event.is_set()
        report.results.sort(key=lambda r: (r.worker_id, r.step_id))
        return report

    # -- watch: what may begin now -----------------------------------------------------------

    def issue(self, plan: Plan, on_result: Listener | None = None) -> list[Step]:
        """Begin, each in its own thread, the steps of ``plan`` that wait for nothing; return
        them. ``on_result`` hears each result when its step ends (spawns end once their
        process runs)."""
        self._context.wait = False
        issued = []
        for step in Schedule.of(plan.steps).runnable():
            if step.kind == StepKind.AWAIT or step.worker_id in self.in_flight():
                continue
            thread = threading.Thread(target=self._issued, args=(step, on_result), daemon=True,
                                      name=step.id)
            with self._lock:
                self._in_flight[step.worker_id] = thread
            thread.start()
            issued.append(step)
        return issued

    def _issued(self, step: Step, on_result: Listener | None) -> None:
        try:
            result = self._perform(step, {})
        finally:
            with self._lock:
                self._in_flight.pop(step.worker_id, None)
        if on_result is not None:
            on_result(result)

    def in_flight(self) -> frozenset[str]:
        """Workers a step issued by `issue` is still acting on."""
        with self._lock:
            return frozenset(self._in_flight)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the steps in flight to end (watch, when it stops)."""
        with self._lock:
            threads = list(self._in_flight.values())
        for thread in threads:
            thread.join(timeout)

    # -- one step ----------------------------------------------------------------------------

    def _perform(self, step: Step, results: Mapping[str, StepResult]) -> StepResult:
        ctx = self._context
        try:
            if step.kind in (StepKind.STOP, StepKind.STOP_LEFTOVERS):
                return stop_step(ctx, step)
            if step.kind == StepKind.AWAIT:
                return await_step(ctx, step)
            if step.kind == StepKind.ADOPT:
                return adopt_step(ctx, step)
            assert step.worker is not None
            env, missing = resolve_env(step.worker, self.environ)
            if missing:
                return StepResult(step.worker_id, step.kind, Outcome.MISSING_SECRET,
                                  f"environment variable(s) {', '.join(sorted(set(missing)))} "
                                  "not set; nothing was changed for this worker",
                                  hint="export them where gardenctl runs (they are passed to "
                                  "the worker, never written down)", step_id=step.id)
            because = next((results[n.step_id].message for n in step.after
                            if n.step_id in results and not results[n.step_id].ok), "")
            return spawn_step(ctx, step, env, because)
        except Exception as exc:  # noqa: BLE001 - reported as the step's failure, never lost
            return StepResult(step.worker_id, step.kind, Outcome.SPAWN_FAILED,
                              f"{type(exc).__name__}: {exc}", step_id=step.id)


def execute(plan: Plan, runtime: base.Runtime, *, environ: Mapping[str, str],
            probe: base.GpuProbe | None = None, progress: Progress | None = None,
            clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep, poll_interval: float = 0.25,
            release_timeout: float = RELEASE_TIMEOUT, stop_event: threading.Event | None = None,
            wall: Callable[[], float] = time.time,
            on_result: Listener | None = None) -> ApplyReport:
    """Run every step of ``plan`` (apply)."""
    executor = Executor(runtime, environ=environ, probe=probe, progress=progress, clock=clock,
                        sleep=sleep, wall=wall, poll_interval=poll_interval,
                        release_timeout=release_timeout, stop_event=stop_event)
    return executor.run(plan, on_result)


def _skipped(dropped: Dropped, results: Mapping[str, StepResult]) -> StepResult:
    step = dropped.step
    failed = results.get(dropped.needed.step_id)
    why = f"{dropped.needed.step_id} failed" + (f" ({failed.message})" if failed else "")
    if failed is not None and failed.outcome == Outcome.DEFERRED:
        why = f"{dropped.needed.step_id} was deferred ({failed.message})"
    elif failed is None:
        why = f"{dropped.needed.step_id} did not happen"
    verb = "not started" if step.kind.spawns else "not done"
    return StepResult(step.worker_id, step.kind, Outcome.SKIPPED, f"{verb}: {why}",
                      step_id=step.id)


def _emitter(report: ApplyReport, listener: Listener | None) -> Listener:
    lock = threading.Lock()

    def emit(result: StepResult) -> None:
        with lock:
            report.results.append(result)
        if listener is not None:
            listener(result)

    return emit


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        while thread.is_alive():
            thread.join(timeout=0.2)
