"""Gathering `status`: every worker in every state, GPU ledgers with live use, the sync verdict.

A worker appears whatever its state: loading, ready, unhealthy, stopping, crashed or failed
(from its record), held by the crash-loop backoff, waiting for something outside gardenctl
(an unset secret, a taken port) or not started yet (from the plan). Each row says what the
plan would do next and why, with the restarts, the backoff and the last error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from gardenctl.backoff import BackoffPolicy, failures_in_a_row
from gardenctl.errors import GardenError
from gardenctl.observe import Observed, ObservedWorker
from gardenctl.placement.standby import booked_bytes
from gardenctl.plan.model import Plan, Step
from gardenctl.profiles.learn import Measured
from gardenctl.state import StandbyView, StateDir
from gardenctl.vocab import StepKind

if TYPE_CHECKING:
    from gardenctl.runtime.base import Runtime
    from gardenctl.workers import DesiredWorker


@dataclass(frozen=True)
class GpuStatus:
    node: str
    index: int
    name: str
    total_bytes: int
    used_by_others_bytes: int
    claimed_bytes: int
    used_by_ours_bytes: int | None  # None where NVML cannot say (simulated GPUs)


@dataclass(frozen=True)
class WorkerStatusRow:
    worker_id: str
    model: str
    node: str
    gpus: tuple[int, ...]
    port: int
    phase: str  # starting, ready, unhealthy, stopping, crashed, failed, unknown; or, with no
    # process: pending (to be started), held (backoff), waiting (blocked)
    restarts: int
    uptime_s: float | None
    last_error: str | None
    cause: str | None
    hint: str
    pid: int | None
    utilization: float
    claim_bytes: int
    next_step: str | None  # what the plan would do (start, restart, hold, wait, ...); None: keep
    next_cause: str  # why
    failures: int  # failed runs in a row (backoff)
    next_start_after: float | None  # backoff: not before this wall-clock time
    memory: WorkerMemory | None = None  # claimed / measured / estimated, per GPU
    standby: StandbyStatus | None = None  # standby workers only

    def to_json(self) -> dict[str, Any]:
        return {
            "worker": self.worker_id, "worker_id": self.worker_id, "model": self.model,
            "node": self.node, "gpus": list(self.gpus), "port": self.port, "phase": self.phase,
            "restarts": self.restarts, "uptime_s": self.uptime_s, "last_error": self.last_error,
            "cause": self.cause, "message": self.last_error, "hint": self.hint, "pid": self.pid,
            "utilization": self.utilization, "claim_bytes": self.claim_bytes,
            "next_step": self.next_step, "next_cause": self.next_cause,
            "backoff": None if not self.failures else {
                "failures": self.failures, "next_start_after": self.next_start_after},
            "measured": (self.memory.measured.to_json()
                         if self.memory is not None and self.memory.measured is not None
                         else None),
            "estimated_bytes": self.memory.estimated_bytes if self.memory else None,
            "memory_source": self.memory.source if self.memory else None,
            "memory_notes": list(self.memory.notes) if self.memory else [],
            "standby": self.standby.to_json() if self.standby is not None else None,
        }


@dataclass(frozen=True)
class StandbyStatus:
    """A standby worker's sleep: its level, its state now (awake, asleep, waking, sleeping;
    "unknown" when neither the worker nor a gateway says), what waking it takes back (planned,
    and measured by its own sleep), and the gateway's wake-up count, last wake-up (wall time)
    and how long that took."""

    mode: str  # "sleep" | "stop"
    level: int  # the sleep level (sleep mode)
    asleep_bytes: int
    state: str
    wake_bytes: int  # what waking it takes back, as planned (awake claim - asleep bytes)
    measured_wake_bytes: int | None  # what its first sleep freed, from its vLLM log
    wakes: int = 0
    last_wake: float | None = None
    last_wake_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "level": self.level, "asleep_bytes": self.asleep_bytes,
                "state": self.state,
                "wake_bytes": self.wake_bytes, "measured_wake_bytes": self.measured_wake_bytes,
                "wakes": self.wakes, "last_wake": self.last_wake,
                "last_wake_s": self.last_wake_s}


@dataclass(frozen=True)
class WorkerMemory:
    """One worker's memory per GPU: what it claims (the plan reserved), what it measured (its
    vLLM log, and NVML where present), what the plan estimated (or sized from a profile)."""

    measured: Measured | None
    estimated_bytes: int | None
    source: str | None  # "estimate" | "measured" (how the plan sized the model)
    source_note: str
    notes: tuple[str, ...]  # holds more than claimed, far less, below min_concurrency


@dataclass(frozen=True)
class WatchInfo:
    running: bool
    pid: int | None
    last_applied: dict[str, Any] | None
    last_attempted: dict[str, Any] | None


@dataclass
class StatusReport:
    garden: str | None
    garden_file: str
    in_sync: bool | None  # None: could not tell (no valid garden file)
    out_of_sync: list[str] = field(default_factory=list)
    gpus: list[GpuStatus] = field(default_factory=list)
    workers: list[WorkerStatusRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    watch: WatchInfo | None = None
    log_tails: dict[str, list[str]] = field(default_factory=dict)  # ended workers' last lines

    def sync_line(self) -> str:
        if self.in_sync is None:
            return "sync unknown"
        return "in sync" if self.in_sync else "OUT OF SYNC"

    def to_json(self) -> dict[str, Any]:
        return {
            "garden": self.garden,
            "garden_file": self.garden_file,
            "in_sync": self.in_sync,
            "out_of_sync_reasons": self.out_of_sync,
            "notes": self.notes,
            "gpus": [g.__dict__ for g in self.gpus],
            "workers": [{**w.to_json(), "last_log_lines": self.log_tails.get(w.worker_id, [])}
                        for w in self.workers],
            "watch": None if self.watch is None else self.watch.__dict__,
        }


def gather_status(garden_path: str, inventory_path: str | None, state_path: str | None,
                  now: float) -> StatusReport:
    from gardenctl.inventory import resolve_inventory
    from gardenctl.planner import used_by_others
    from gardenctl.spec.loader import load_garden
    from gardenctl.workflow import plan_read_only, read_only_runtime

    state = StateDir(state_path)
    report = StatusReport(garden=None, garden_file=garden_path, in_sync=None)
    try:
        loaded = load_garden(garden_path)
    except GardenError as exc:
        report.notes.append(f"the garden file cannot be used: {exc}")
        report.notes.append("showing the workers of every garden in the state directory")
        return _from_records_only(report, state, now)
    report.garden = loaded.garden.name
    inventory = resolve_inventory(loaded.garden, garden_path, inventory_path)
    result = plan_read_only(loaded, inventory, state, preflight=False)
    observed = result.observed
    report.notes += list(observed.notes)
    mine = observed.of_garden(loaded.garden.name)
    plan = result.plan
    report.in_sync = plan.converged
    report.out_of_sync = [f"{s.kind.value} {s.worker_id}: {s.cause}" for s in plan.steps
                          if s.kind != StepKind.KEEP and not s.conditional]
    report.out_of_sync += [f"unplaced {u.worker_id}: " + "; ".join(r.message for r in u.reasons)
                           for u in plan.unplaced]
    others = used_by_others(inventory, observed, loaded.garden.name)
    pids = {pid for w in mine.workers for pid in w.pids}
    for gpu in inventory.gpus:
        claimed = booked_bytes(
            (w.claim_bytes, w.spec.standby.asleep_bytes if w.spec.standby else None)
            for w in mine.workers if w.running and w.node == gpu.node and gpu.index in w.gpus)
        used = None
        if inventory.used_includes_ours:
            used = sum(p.used_bytes or 0 for p in gpu.processes if p.pid in pids)
        report.gpus.append(GpuStatus(gpu.node, gpu.index, gpu.name, gpu.total_bytes,
                                     others.get(gpu.key, 0), claimed, used))
    runtime = read_only_runtime(loaded, inventory, state)  # reads the workers' logs
    views = state.read_standby(loaded.garden.name)
    rows = [replace(row, memory=_memory(row, plan, result, runtime))
            for row in worker_rows(plan, mine, now)]
    report.workers = [replace(row, standby=_standby(row, mine.get(row.worker_id), plan,
                                                    runtime, views))
                      for row in rows]
    report.watch = _watch_info(state, loaded.garden.name)
    report.log_tails = _ended_tails(runtime, mine)
    return report


def worker_rows(plan: Plan, observed: Observed, now: float,
                policy: BackoffPolicy | None = None) -> list[WorkerStatusRow]:
    """One row per worker the garden wants or has, in worker order."""
    policy = policy or BackoffPolicy()
    steps: dict[str, Step] = {}
    for step in plan.steps:
        if not step.conditional and step.kind != StepKind.STOP_LEFTOVERS:
            steps.setdefault(step.worker_id, step)
            if step.kind in (StepKind.HOLD, StepKind.WAIT):
                steps[step.worker_id] = step  # what the worker waits for matters most
    rows = []
    ids = sorted({*steps, *(w.worker_id for w in observed.workers)})
    for worker_id in ids:
        rows.append(_row(observed.get(worker_id), steps.get(worker_id), now, policy))
    return rows


def _row(current: ObservedWorker | None, step: Step | None, now: float,
         policy: BackoffPolicy) -> WorkerStatusRow:
    target = step.worker if step is not None and step.worker is not None else None
    spec = current.spec if current is not None else target
    assert spec is not None
    next_step = None if step is None or step.kind == StepKind.KEEP else step.kind.value
    if current is None:
        phase = {"wait": "waiting", "hold": "held"}.get(next_step or "", "pending")
        if step is not None and step.kind == StepKind.KEEP:
            phase = "stopped (standby)"  # a `standby: stop` worker no request needs now
        return WorkerStatusRow(spec.worker_id, spec.model, spec.node, spec.gpus, spec.port,
                               phase, 0, None, None, None, "", None, spec.utilization,
                               spec.claim_bytes, next_step, step.cause if step else "", 0, None)
    failures = current.streak
    if current.phase.dead:
        failures = failures_in_a_row(current, policy, now)
    until = step.until if step is not None and step.kind == StepKind.HOLD else None
    uptime = now - current.started_at if current.running and current.started_at else None
    return WorkerStatusRow(
        current.worker_id, current.model, current.node, current.gpus, current.port,
        current.phase.value, current.restarts, uptime, current.last_error,
        current.cause.value if current.cause else None, current.hint, current.pid,
        current.utilization, current.claim_bytes, next_step, step.cause if step else "",
        failures, until)


def _standby(row: WorkerStatusRow, current: ObservedWorker | None, plan: Plan,
             runtime: Runtime | None, views: Mapping[str, StandbyView]) -> StandbyStatus | None:
    """A sleep worker: asleep or awake from the worker itself (GET /is_sleeping); waking,
    sleeping and the wake-up figures from the gateway's file, when it speaks of this very
    process. A stop worker: stopped while it has no process, else the gateway's word (awake,
    waking, stopping) or "awake"."""
    spec = current.spec if current is not None else _planned(plan, row.worker_id)
    if spec is None or spec.standby is None:
        return None
    standby = spec.standby
    measured = row.memory.measured if row.memory is not None else None
    freed = measured.sleep_freed_bytes if measured is not None else None
    wake = (spec.claim_bytes - standby.asleep_bytes, freed)
    view = views.get(row.worker_id)
    running = current is not None and current.running
    if view is not None and current is not None and running and view.pid != current.pid:
        view = None  # about an earlier run
    if standby.sleeps:
        if not running:
            return None
        asleep = runtime.is_sleeping(row.worker_id) if runtime is not None else None
        state = ("asleep" if asleep else "awake") if asleep is not None else "unknown"
        if view is not None and view.state in ("waking", "sleeping"):
            state = view.state
    else:
        state = view.state if view is not None else ("awake" if running else "stopped")
    counts = (view.wakes, view.last_wake, view.last_wake_s) if view is not None else ()
    return StandbyStatus(standby.mode, standby.level, standby.asleep_bytes, state, *wake,
                         *counts)


def _planned(plan: Plan, worker_id: str) -> DesiredWorker | None:
    return next((s.worker for s in plan.steps if s.worker_id == worker_id and s.worker), None)


def _memory(row: WorkerStatusRow, plan: Plan, result: Any,
            runtime: Runtime | None) -> WorkerMemory:
    """Claimed / measured / estimated for one row (measured only for a worker that runs)."""
    from gardenctl.profiles.learn import claim_note, measure_worker

    summary = next((m for m in plan.models if m.name == row.model), None)
    worker = result.observed.get(row.worker_id)
    measured = None
    if worker is not None and worker.running and worker.garden == result.loaded.garden.name:
        startup = runtime.startup_log(row.worker_id) if runtime is not None else None
        measured = measure_worker(worker, startup, result.inventory)
    notes: tuple[str, ...] = ()
    if measured is not None and summary is not None:
        estimate = result.estimates.get(row.model)
        notes = tuple(claim_note(
            measured, row.claim_bytes, summary.min_concurrency,
            measured_per_token(measured, summary.kv_bytes_per_token),
            summary.max_model_len, estimate.cuda_context.bytes if estimate else 0))
    return WorkerMemory(
        measured=measured,
        estimated_bytes=summary.total_bytes if summary else None,
        source=summary.memory_source if summary else None,
        source_note=summary.memory_note if summary else "",
        notes=notes)


def measured_per_token(measured: Measured, fallback: int) -> int:
    from gardenctl.profiles.model import kv_bytes_per_token

    if measured.kv_cache_bytes and measured.kv_cache_tokens:
        return kv_bytes_per_token(measured.kv_cache_bytes, measured.kv_cache_tokens)
    return fallback


def _same_process(pid: int, started_at: object) -> bool:
    """The watch that wrote watch.json still runs: its pid is alive and was not reused (the
    process began before the watch said it started)."""
    import calendar

    import psutil

    try:
        began = psutil.Process(pid).create_time()
        whole_seconds = str(started_at).split(".")[0].rstrip("Z")
        said = calendar.timegm(time.strptime(whole_seconds, "%Y-%m-%dT%H:%M:%S"))
    except (psutil.Error, ValueError, OverflowError):
        return False
    return began <= said + 1.0


def watch_running(state: StateDir, garden: str) -> bool:
    """A `gardenctl watch` of this garden runs now (its watch.json names a live process)."""
    info = _watch_info(state, garden)
    return info is not None and info.running


def _watch_info(state: StateDir, garden: str) -> WatchInfo | None:
    """What a `gardenctl watch` of this garden last reported (watch.json), if one ever ran."""
    path = state.root / "gardens" / garden / "watch.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = data.get("pid")
    running = bool(pid) and not data.get("stopped") and _same_process(pid, data.get("started_at"))
    return WatchInfo(running, pid, data.get("last_applied"), data.get("last_attempted"))


def _ended_tails(runtime: Runtime | None, observed: Observed) -> dict[str, list[str]]:
    """The last lines of each ended worker's log (what it said as it died)."""
    if runtime is None:
        return {}
    return {w.worker_id: (runtime.read_log(w.worker_id, limit=16 * 1024) or "").splitlines()[-3:]
            for w in observed.workers if w.phase.dead}


def _from_records_only(report: StatusReport, state: StateDir, now: float) -> StatusReport:
    from gardenctl.runtime.local import LocalRuntime

    if state.exists:
        observed = LocalRuntime(state, node="", writable=False).observe()
        report.workers = [_row(w, None, now, BackoffPolicy()) for w in observed.workers]
    return report
