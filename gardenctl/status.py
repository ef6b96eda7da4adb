"""Gathering `status`: observed workers, GPU ledgers with live use, and the sync verdict."""

from __future__ import annotations

from dataclasses import dataclass, field

from gardenctl.errors import GardenError
from gardenctl.observe import Observed, ObservedWorker


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
    gpus: tuple[int, ...]
    port: int
    phase: str
    restarts: int
    uptime_s: float | None
    last_error: str | None
    pid: int | None
    utilization: float
    claim_bytes: int


@dataclass(frozen=True)
class WatchInfo:
    running: bool
    pid: int | None
    last_applied: dict | None
    last_attempted: dict | None
    backoff: dict  # worker id -> {failures, next_start_after, last_error}


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
    log_tails: dict[str, list[str]] = field(default_factory=dict)  # crashed workers' last lines

    def sync_line(self) -> str:
        if self.in_sync is None:
            return "sync unknown"
        return "in sync" if self.in_sync else "OUT OF SYNC"

    def to_json(self) -> dict:
        return {
            "garden": self.garden,
            "garden_file": self.garden_file,
            "in_sync": self.in_sync,
            "out_of_sync_reasons": self.out_of_sync,
            "notes": self.notes,
            "gpus": [g.__dict__ for g in self.gpus],
            "workers": [{**w.__dict__, "worker": w.worker_id, "gpus": list(w.gpus),
                         "backoff": (self.watch.backoff.get(w.worker_id) if self.watch else None),
                         "last_log_lines": self.log_tails.get(w.worker_id, [])}
                        for w in self.workers],
            "watch": None if self.watch is None else self.watch.__dict__,
        }


def gather_status(garden_path: str, inventory_path: str | None, state_path: str | None,
                  now: float) -> StatusReport:
    from gardenctl.inventory import resolve_inventory
    from gardenctl.planner import used_by_others
    from gardenctl.spec.loader import load_garden
    from gardenctl.workflow import compute_plan, observe_without_lock

    report = StatusReport(garden=None, garden_file=garden_path, in_sync=None)
    try:
        loaded = load_garden(garden_path)
    except GardenError as exc:
        report.notes.append(f"the garden file cannot be used: {exc}")
        report.notes.append("showing the workers of every garden in the state directory")
        return _from_records_only(report, state_path, now)
    report.garden = loaded.garden.name
    inventory = resolve_inventory(loaded.garden, garden_path, inventory_path)
    observed = observe_without_lock(loaded, inventory, state_path)
    report.notes += list(observed.notes)
    mine = observed.of_garden(loaded.garden.name)
    result = compute_plan(loaded, inventory, observed)
    plan = result.plan
    report.in_sync = not plan.has_changes and not plan.unplaced
    report.out_of_sync = [f"{a.action} {a.worker_id}: {a.cause}" for a in plan.actions
                          if a.changes]
    report.out_of_sync += [f"unplaced {u.worker_id}: " + "; ".join(r.message for r in u.reasons)
                           for u in plan.unplaced]
    others = used_by_others(inventory, mine)
    for gpu in inventory.gpus:
        claimed = sum(w.claim_bytes for w in mine.workers
                      if w.running and w.node == gpu.node and gpu.index in w.gpus)
        used = None
        if inventory.used_includes_ours:
            pids = {pid for w in mine.workers for pid in w.pids}
            used = sum(p.used_bytes or 0 for p in gpu.processes if p.pid in pids)
        report.gpus.append(GpuStatus(gpu.node, gpu.index, gpu.name, gpu.total_bytes,
                                     others.get(gpu.key, 0), claimed, used))
    report.workers = [_row(w, now) for w in mine.workers]
    report.watch = _watch_info(state_path, loaded.garden.name)
    report.log_tails = _crash_tails(state_path, mine)
    return report


def _watch_info(state_path: str | None, garden: str) -> WatchInfo | None:
    """What a `gardenctl watch` of this garden last reported (watch.json), if one ever ran."""
    import json

    import psutil

    from gardenctl.state import StateDir

    path = StateDir(state_path).root / "gardens" / garden / "watch.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = data.get("pid")
    running = bool(pid) and not data.get("stopped") and psutil.pid_exists(pid)
    return WatchInfo(running, pid, data.get("last_applied"), data.get("last_attempted"),
                     data.get("backoff") or {})


def _crash_tails(state_path: str | None, observed: Observed) -> dict[str, list[str]]:
    from gardenctl.runtime.local import last_lines, read_tail
    from gardenctl.state import StateDir

    state = StateDir(state_path)
    tails = {}
    for worker in observed.workers:
        if worker.phase == "crashed":
            text = last_lines(read_tail(str(state.log_path(worker.worker_id))), 3)
            tails[worker.worker_id] = text.splitlines()
    return tails


def _from_records_only(report: StatusReport, state_path: str | None, now: float) -> StatusReport:
    from gardenctl.runtime.local import LocalRuntime
    from gardenctl.state import StateDir

    state = StateDir(state_path)
    if (state.root / "gardens").is_dir():
        observed: Observed = LocalRuntime(state, node="", writable=False).observe()
        report.workers = [_row(w, now) for w in observed.workers]
    return report


def _row(worker: ObservedWorker, now: float) -> WorkerStatusRow:
    uptime = now - worker.started_at if worker.running and worker.started_at else None
    return WorkerStatusRow(worker.worker_id, worker.model, worker.gpus, worker.port, worker.phase,
                           worker.restarts, uptime, worker.last_error, worker.pid,
                           worker.utilization, worker.claim_bytes)
