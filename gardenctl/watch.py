"""`watch`: keep converging, level-based, and never wait on one worker.

Each pass re-reads the file (never trusting the event), re-observes the workers, re-plans,
and *issues* the steps that may begin now (`Executor.issue`): stops run in the background,
spawns return as soon as the process runs. A pass takes a fraction of a second however long
models take to load; a load in progress is a state later passes observe (the plan waits for
it on its GPU), not a call a pass waits for. So a worker that dies anywhere is acted on within
about a second while others load, GPU by GPU (still one start at a time per GPU).

Triggers of a pass: a change of the garden file (its directory is watched, since editors save
by writing a temp file and renaming it; a burst of saves is debounced: a new version is read
only once the file has been quiet for `debounce_ms`, by the pass that the quiet triggers and by
any other pass alike), a worker's process
gone (checked every `tick`), a loading worker ready or ended, a step ending, a liveness probe
failing `failure_threshold` times in a row (the prober thread probes ready workers' /health
every `liveness.period`), a backoff or start timeout expiring, and a jittered resync.

A new version of the file is accepted only if it parses, validates, fits the GPUs, keeps the
garden's name, and does not stop every worker (unless --allow-empty). Otherwise the last good
version stays in force and keeps being converged. Both versions (content hashes) are reported.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from gardenctl.errors import GardenError, LockHeldError, SpecError
from gardenctl.events import EventLog, iso_utc
from gardenctl.execute import Executor, StepResult
from gardenctl.files import write_json_atomic
from gardenctl.observe import Observed
from gardenctl.plan.model import Plan
from gardenctl.runtime.base import Runtime
from gardenctl.session import Session
from gardenctl.spec.loader import LoadedGarden, parse_garden
from gardenctl.vocab import Outcome, Phase, StepKind
from gardenctl.workflow import PlanResult

WATCH_FORMAT_VERSION = 2
POLL_INTERVAL = 0.25  # seconds, --poll
READY_POLL = 0.5  # seconds between readiness checks of a loading worker
RETRY_DEFERRED = 1.0  # seconds before a wait on a busy GPU or port (or a deferred step) looks again


def _digest_of(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        return f"unreadable:{exc.errno}"


@dataclass(frozen=True)
class WatchOptions:
    garden_path: str
    inventory_path: str | None = None
    resync: float = 30.0
    jitter: float = 0.1
    debounce_ms: int = 300
    poll: bool = False
    allow_empty: bool = False
    tick: float = 0.25  # how often deaths, loads and timers are checked


class _Progress:
    """Executor progress -> one event when a worker begins to stop or start."""

    def __init__(self, log: EventLog) -> None:
        self.log = log

    def update(self, worker_id: str, phase: str, detail: str, elapsed: float) -> None:
        if phase == "stopping":
            self.log.emit("stopping", "stopping the worker", worker=worker_id)
        elif phase == "spawning":
            self.log.emit("starting", "spawning the worker", worker=worker_id)


class _FileQuiet:
    """When the garden file last changed, so that a version is read only once its saves end:
    written by the file-watching thread, read by the loop (a lock keeps the pair consistent)."""

    def __init__(self, debounce_ms: int) -> None:
        self.window = debounce_ms / 1000
        self._lock = threading.Lock()
        self._changed_at: float | None = None

    def changed(self) -> None:
        with self._lock:
            self._changed_at = time.monotonic()

    def remaining(self) -> float | None:
        """Seconds until the file is quiet for the window; None when no change is pending."""
        with self._lock:
            if self._changed_at is None:
                return None
            return max(0.0, self.window - (time.monotonic() - self._changed_at))

    def take_settled(self) -> bool:
        """True once per burst of changes, when it has been quiet for the window."""
        with self._lock:
            if self._changed_at is None or time.monotonic() - self._changed_at < self.window:
                return False
            self._changed_at = None
            return True


@dataclass
class _Reported:
    """What was already said, so that a steady state is not repeated every pass."""

    holds: dict[str, float] = field(default_factory=dict)
    waits: dict[str, str] = field(default_factory=dict)
    loading: set[str] = field(default_factory=set)
    ended: dict[str, float] = field(default_factory=dict)  # worker -> when its run ended


_UNSEEN = object()  # the demand file was not looked at yet


class Watcher:
    def __init__(self, session: Session, options: WatchOptions, log: EventLog, *,
                 wall: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.session = session
        self.options = options
        self.log = log
        self.wall = wall
        self.rng = rng or random.Random()
        self.stop = threading.Event()
        self.triggers: queue.Queue[str] = queue.Queue()
        # the executor of the runtime now; one left by a runtime replaced (the inventory's node
        # renamed) is kept until its steps in flight end
        self.executors: list[Executor] = []
        self.last_good: LoadedGarden | None = None
        self.last_plan: Plan | None = None
        self.last_attempted: tuple[str, float, bool, str | None] | None = None
        self.last_applied: tuple[str, float] | None = None
        self.seen_dead: set[tuple[str, int | None]] = set()
        self.started_at = wall()
        self.rejected: tuple[str, LoadedGarden, str] | None = None  # digest, version, why
        self.invalid_digest: str | None = None
        self._waiting_logged = False
        self.stop_reason: str | None = None
        self.loading: dict[str, float] = {}  # worker id -> start timeout deadline (wall)
        self.timers: list[tuple[float, str]] = []  # (when, reason)
        self._reported = _Reported()
        self.prober = _Prober(self)
        self.fatal: GardenError | None = None  # why the watch had to end (the caller raises it)
        self._demand_seen: tuple[int, int, int] | object | None = _UNSEEN
        self.file_quiet = _FileQuiet(options.debounce_ms)

    # -- the loop --------------------------------------------------------------------------

    def request_stop(self, reason: str | None = None) -> None:
        """Safe in a signal handler: sets flags only; the loop logs the reason as it ends."""
        self.stop_reason = reason
        self.stop.set()

    def run(self) -> None:
        mode = "polling" if self.options.poll else "file events"
        self.log.emit("watching", f"{self.options.garden_path} ({mode}, resync every "
                      f"{self.options.resync:g}s)", pid=os.getpid())
        threading.Thread(target=self._watch_files, name="watch files", daemon=True).start()
        threading.Thread(target=self.prober.run, name="liveness", daemon=True).start()
        reason: str | None = "start"
        try:
            while reason is not None and not self.stop.is_set():
                self.pass_once(reason)
                reason = self._wait_for_trigger()
        finally:
            self.stop.set()
            if self.stop_reason:
                self.log.emit("signal", f"received {self.stop_reason}; stopping")
            for executor in self.executors:
                executor.stop_event.set()
                executor.join()
            self._write_status(stopped=True)
            self.log.emit("stopped", "watch stopped; workers keep running (`gardenctl down` "
                          "stops them)")

    def _watch_files(self) -> None:
        if self.options.poll:
            self._poll_file()
            return
        import watchfiles

        path = Path(self.options.garden_path).resolve()
        name = path.name

        def only_the_garden(change: object, changed: str) -> bool:
            return Path(changed).name == name

        try:
            # short groups, so that the quiet window is measured from the burst's last save
            for _ in watchfiles.watch(path.parent, watch_filter=only_the_garden,
                                      debounce=100, step=50,
                                      stop_event=self.stop, recursive=False,
                                      raise_interrupt=False):
                self.file_quiet.changed()
        except Exception as exc:  # noqa: BLE001 - reported; resync keeps converging
            self.log.emit("error", f"file watching stopped ({type(exc).__name__}: {exc}); "
                          "changes are picked up at each resync")

    def _poll_file(self) -> None:
        """--poll: read the file every POLL_INTERVAL and compare contents (mtimes can be too
        coarse on network file systems to see two saves in one second)."""
        seen = _digest_of(self.options.garden_path)
        while not self.stop.wait(POLL_INTERVAL):
            digest = _digest_of(self.options.garden_path)
            if digest != seen:
                seen = digest
                self.file_quiet.changed()

    def _wait_for_trigger(self) -> str | None:
        resync_at = self.wall() + self.options.resync * self.rng.uniform(
            1 - self.options.jitter, 1 + self.options.jitter)
        next_ready_check = 0.0
        while not self.stop.is_set():
            try:
                quiet_in = self.file_quiet.remaining()
                timeout = self.options.tick if quiet_in is None else \
                    min(self.options.tick, quiet_in + 0.01)
                reason = self.triggers.get(timeout=timeout)
                while not self.triggers.empty():
                    self.triggers.get_nowait()
                return reason
            except queue.Empty:
                pass
            if self.file_quiet.take_settled():
                return "file changed"
            now = self.wall()
            if now >= resync_at:
                return "resync"
            due = [why for when, why in self.timers if now >= when]
            if due:
                return due[0]
            death = self._deaths()
            if death is not None:
                return death
            if self._demand_changed():
                return "standby demand changed"
            if now >= next_ready_check and self.loading:
                next_ready_check = now + READY_POLL
                load = self._loads_changed()
                if load is not None:
                    return load
        return None

    def _demand_changed(self) -> bool:
        """The gateway wants a `standby: stop` worker started (or no longer needs one): its
        demand file changed (a stat per tick)."""
        if self.last_good is None:
            return False
        try:
            stat = self.session.state.demand_path(self.last_good.garden.name).stat()
            seen: tuple[int, int, int] | None = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except OSError:
            seen = None
        # first look: a demand file there at all may have been written during the first pass
        # (one more pass costs a plan; a missed demand would wait for the next resync)
        changed = seen != self._demand_seen and (self._demand_seen is not _UNSEEN
                                                 or seen is not None)
        self._demand_seen = seen
        return changed

    def _deaths(self) -> str | None:
        runtime = self.session.runtime
        if runtime is None:
            return None
        dead = runtime.dead_workers() - self.seen_dead
        if not dead:
            return None
        self.seen_dead |= dead
        names = ", ".join(sorted(w for w, _ in dead))
        self.log.emit("exited", f"worker process gone: {names}")
        return "worker exited"

    def _loads_changed(self) -> str | None:
        runtime = self.session.runtime
        if runtime is None:
            return None
        for worker_id in sorted(self.loading):
            status = runtime.check(worker_id)
            if status.phase != Phase.STARTING:
                return "worker ready" if status.phase == Phase.READY else "worker exited"
        return None

    # -- one pass --------------------------------------------------------------------------

    def pass_once(self, reason: str) -> None:
        """One pass; whatever goes wrong, the watcher lives on and keeps the last good garden."""
        try:
            self._pass(reason)
        except GardenError as exc:
            self.log.emit("error", f"pass failed: {exc}", reason=reason)
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the healing
            self.log.emit("error", f"internal error in this pass (a bug in gardenctl, please "
                          f"report it): {type(exc).__name__}: {exc}", reason=reason)
        self._write_status()

    def _plan(self, loaded: LoadedGarden, observed: Observed | None = None, *,
              candidate: bool = False) -> PlanResult:
        """Plan ``loaded``; a ``candidate`` (a new version of the file) must also pass the
        pre-flight checks; the version in force keeps healing whatever they say now."""
        in_flight = self.in_flight()
        said = self.session.learn_problem
        result = self.session.plan_loaded(loaded, self.options.inventory_path, observed,
                                          confirm_health=False, in_flight=in_flight,
                                          learn=True, preflight=candidate)
        if self.session.learn_problem and self.session.learn_problem != said:
            self.log.emit("error", self.session.learn_problem)  # once, not every pass
        for lesson in self.session.new_lessons:
            self.log.emit("resized", f"{lesson.model}: {lesson.reason}", model=lesson.model,
                          overrides=lesson.overrides())
        self.session.new_lessons = []
        return result

    def _pass(self, reason: str) -> None:
        candidate = self._read_candidate()
        result = None
        observed = None  # one snapshot of the workers per pass
        if candidate is not None:
            digest = candidate.content_hash
            try:
                result = self._plan(candidate, candidate=True)
                observed = result.observed
                refusal = self._refusal(candidate, result)
            except GardenError as exc:
                refusal = f"version {digest[:12]} cannot be planned: {exc}"
            if refusal:
                self._reject(candidate, refusal)
                result = None
            else:
                self._accept(candidate, reason)
        if result is None:
            if self.last_good is None:
                if not self._waiting_logged:
                    self._waiting_logged = True
                    self.log.emit("waiting", "no valid garden file yet; nothing is changed")
                return
            result = self._plan(self.last_good, observed)
        self._execute(result, reason)

    def _accept(self, candidate: LoadedGarden, reason: str) -> None:
        digest = candidate.content_hash
        refused_before = self.last_attempted is not None and not self.last_attempted[2]
        if self.last_good is None:
            try:
                self.session.lock(candidate.garden.name, candidate.garden)
            except LockHeldError as exc:
                self.fatal = exc
                self.request_stop()
                raise
        self.rejected = None
        self._attempted(digest, accepted=True, error=None)
        if self.last_good is None or refused_before or digest != self.last_good.content_hash:
            self.log.emit("accepted", f"garden file version {digest[:12]} ({reason})",
                          version=digest[:12])
        self.last_good = candidate

    def _reject(self, candidate: LoadedGarden, refusal: str) -> None:
        """Keep the last good version; a refusal that depends on the world (GPUs taken, workers
        running) is re-examined at every pass, and logged again only when it changes."""
        digest = candidate.content_hash
        repeated = self.rejected is not None and self.rejected[0] == digest \
            and self.rejected[2] == refusal
        self.rejected = (digest, candidate, refusal)
        self._attempted(digest, accepted=False, error=refusal)
        if not repeated:
            self.log.emit("rejected", f"{refusal}; the last good version stays in force",
                          attempted=digest[:12],
                          applied=self.last_applied[0][:12] if self.last_applied else None)

    def _read_candidate(self) -> LoadedGarden | None:
        """The file's version to consider: None when it is the version in force, cannot be
        read, or failed to parse (until its bytes change)."""
        path = self.options.garden_path
        if self.last_good is not None and self.file_quiet.remaining():
            return None  # saves still coming: the pass their quiet triggers reads the last one
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            marker = f"unreadable:{exc.errno}"
            if self.last_attempted is None or self.last_attempted[0] != marker:
                self.log.emit("invalid", f"cannot read {path}: {exc.strerror}; the last good "
                              "version stays in force")
            self._attempted(marker, accepted=False, error=f"cannot read {path}: {exc.strerror}")
            return None
        digest = hashlib.sha256(raw).hexdigest()
        if self.last_good is not None and digest == self.last_good.content_hash:
            if self.last_attempted is not None and self.last_attempted[0] != digest:
                self._attempted(digest, accepted=True, error=None)  # back to the version in force
            return None
        if digest == self.invalid_digest:
            return None
        if self.rejected is not None and self.rejected[0] == digest:
            return self.rejected[1]
        try:
            return parse_garden(raw, path)
        except SpecError as exc:
            self.invalid_digest = digest
            self._attempted(digest, accepted=False, error=str(exc))
            self.log.emit("invalid", f"garden file version {digest[:12]} is invalid; the last "
                          "good version stays in force", version=digest[:12],
                          issues=[i.to_json() for i in exc.issues])
            for issue in exc.issues:
                self.log.emit("invalid", issue.format())
            return None

    def _refusal(self, candidate: LoadedGarden, result: PlanResult) -> str | None:
        garden = candidate.garden
        if self.last_good is not None and garden.name != self.last_good.garden.name:
            return (f"the garden's name changed from {self.last_good.garden.name!r} to "
                    f"{garden.name!r}; stop the old garden with `gardenctl down --garden "
                    f"{self.last_good.garden.name}` and restart watch")
        plan = result.plan
        if plan.unplaced:
            index = {m.name: i for i, m in enumerate(garden.models)}
            for unplaced in plan.unplaced:
                reasons = "; ".join(r.message for r in unplaced.reasons[:2])
                issue = candidate.source.issue(("models", index.get(unplaced.model, 0)),
                                               f"{unplaced.worker_id} does not fit: {reasons}")
                self.log.emit("rejected", issue.format(), issue=issue.to_json())
            names = ", ".join(u.worker_id for u in plan.unplaced)
            return f"version {candidate.content_hash[:12]} does not fit the GPUs ({names})"
        wanted = sum(1 for s in plan.steps if s.worker is not None)
        running = sum(1 for w in result.observed.of_garden(garden.name).workers if w.running)
        if wanted == 0 and running and not self.options.allow_empty:
            return (f"version {candidate.content_hash[:12]} would stop all {running} worker(s); "
                    "pass --allow-empty to allow that")
        return None

    def _execute(self, result: PlanResult, reason: str) -> None:
        plan = result.plan
        self.last_plan = plan
        executor = self._executor(result)
        self._report_steady_state(plan, result.observed)
        self._arm_timers(plan, result.observed)
        if plan.has_changes:
            self.session.record_applied(result, "watch")
        issued = executor.issue(plan, on_result=self._result)
        self._reported.loading |= {s.worker_id for s in issued if s.kind.spawns}
        if issued:
            kinds = sorted({s.kind.value for s in issued})
            self.log.emit("plan", f"{len(issued)} step(s) begun: {', '.join(kinds)} ({reason})",
                          reason=reason, steps=[s.id for s in issued], **plan.summary())
        if self.last_good is not None:
            self.last_applied = (self.last_good.content_hash, self.wall())

    def _executor(self, result: PlanResult) -> Executor:
        """The executor of the session's runtime (a new one when the runtime was replaced)."""
        current = self.executors[-1] if self.executors else None
        if current is None or current.runtime is not self.session.runtime:
            current = self.session.executor(result, _Progress(self.log))
            self.executors.append(current)
        self.executors = [e for e in self.executors[:-1] if e.in_flight()] + [current]
        return current

    def in_flight(self) -> frozenset[str]:
        """Workers a step issued by this watch is still acting on."""
        return frozenset().union(*(e.in_flight() for e in self.executors))

    def _result(self, r: StepResult) -> None:
        """One event line per step, as soon as its outcome is known; its end triggers a pass
        (the next step on that GPU may begin)."""
        if r.outcome == Outcome.DEFERRED:  # another garden's worker took the GPU first
            if self._reported.waits.get(r.worker_id) != r.message:
                self._reported.waits[r.worker_id] = r.message
                self.log.emit("waiting", r.message, worker=r.worker_id, step=r.kind.value)
            self.timers.append((self.wall() + RETRY_DEFERRED, "GPU free again?"))
            return
        status = "ok" if r.ok else "failed"
        self.log.emit(r.kind.value, f"{status}: {r.message}", worker=r.worker_id, ok=r.ok,
                      outcome=r.outcome.value, cause=r.cause.value if r.cause else None,
                      elapsed_s=round(r.elapsed, 3))
        self.triggers.put(f"{r.kind.value} {status}")

    def _report_steady_state(self, plan: Plan, observed: Observed) -> None:
        """Holds, waits and loads, each said once (again when it changes)."""
        reported = self._reported
        for step in plan.steps:
            if step.kind == StepKind.HOLD and reported.holds.get(step.worker_id) != step.until:
                reported.holds[step.worker_id] = step.until or 0.0
                wait = max(0.0, (step.until or 0.0) - self.wall())
                self.log.emit("backoff", step.cause, worker=step.worker_id,
                              seconds=round(wait, 1), until=iso_utc(step.until or 0.0),
                              failures=step.launch.streak if step.launch else None)
            elif step.kind == StepKind.WAIT and reported.waits.get(step.worker_id) != step.cause:
                reported.waits[step.worker_id] = step.cause
                self.log.emit("waiting", step.cause, worker=step.worker_id)
        mine = observed.of_garden(plan.garden).workers
        for worker in mine:
            if worker.phase.dead and worker.exited_at is not None \
                    and reported.ended.get(worker.worker_id) != worker.exited_at:
                reported.ended[worker.worker_id] = worker.exited_at
                self.log.emit(worker.phase.value, worker.last_error or "its run ended",
                              worker=worker.worker_id,
                              cause=worker.cause.value if worker.cause else None,
                              exit_code=worker.exit_code, ok=False)
        ready_now = {w.worker_id for w in mine if w.phase == Phase.READY}
        for worker_id in sorted(reported.loading & ready_now):
            self.log.emit("ready", "answers /health and /v1/models", worker=worker_id)
        over = {w.worker_id for w in mine if w.phase.dead}
        reported.loading = (reported.loading - ready_now - over) | {
            s.worker_id for s in plan.steps if s.kind == StepKind.AWAIT}
        reported.holds = {k: v for k, v in reported.holds.items()
                          if any(s.worker_id == k and s.kind == StepKind.HOLD for s in plan.steps)}
        reported.waits = {k: v for k, v in reported.waits.items()
                          if any(s.worker_id == k and s.kind == StepKind.WAIT for s in plan.steps)}

    def _arm_timers(self, plan: Plan, observed: Observed) -> None:
        """When the next pass is due without any event: a backoff or start timeout expiring;
        and which loading workers to check for readiness."""
        timers = [(s.until, "backoff expired") for s in plan.steps
                  if s.kind == StepKind.HOLD and s.until is not None]
        if any(s.blocked_by is not None and s.blocked_by.passes for s in plan.steps):
            timers.append((self.wall() + RETRY_DEFERRED, "GPU or port free again?"))
        loading: dict[str, float] = {}
        for step in plan.steps:
            current = step.previous
            if step.kind == StepKind.AWAIT and current is not None \
                    and current.phase == Phase.STARTING and step.worker is not None:
                deadline = (current.started_at or self.wall()) + step.worker.start_timeout
                loading[step.worker_id] = deadline
                timers.append((deadline + 0.1, "start timeout"))
        self.timers = sorted(timers)
        self.loading = loading
        self.prober.watch(plan, observed)

    # -- reporting -------------------------------------------------------------------------

    def _attempted(self, digest: str, *, accepted: bool, error: str | None) -> None:
        self.last_attempted = (digest, self.wall(), accepted, error)

    def _write_status(self, stopped: bool = False) -> None:
        garden = self.last_good.garden.name if self.last_good else None
        if garden is None:
            return
        now = self.wall()
        document = {
            "format_version": WATCH_FORMAT_VERSION,
            "pid": os.getpid(),
            "garden_file": self.options.garden_path,
            "started_at": iso_utc(self.started_at),
            "updated_at": iso_utc(now),
            "stopped": stopped,
            "last_applied": None if self.last_applied is None else {
                "version": self.last_applied[0][:12], "at": iso_utc(self.last_applied[1])},
            "last_attempted": None if self.last_attempted is None else {
                "version": self.last_attempted[0][:12], "at": iso_utc(self.last_attempted[1]),
                "accepted": self.last_attempted[2], "error": self.last_attempted[3]},
            "backoff": {} if self.last_plan is None else {
                s.worker_id: {"failures": s.launch.streak if s.launch else None,
                              "next_start_after": s.until,
                              "last_error": s.previous.last_error if s.previous else None}
                for s in self.last_plan.steps if s.kind == StepKind.HOLD},
        }
        path = self.session.state.garden_file(garden, "watch.json")
        write_json_atomic(path, document)


class _Prober:
    """Liveness: every ready worker's /health, every `liveness.period`; `failure_threshold`
    failures in a row mark it unhealthy and trigger a pass (which restarts it)."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.lock = threading.Lock()
        self.targets: dict[str, tuple[float, int]] = {}  # worker -> (period, threshold)
        self.failures: dict[str, int] = {}
        self.next_probe: dict[str, float] = {}

    def watch(self, plan: Plan, observed: Observed) -> None:
        """Probe every ready worker of the garden, with the liveness settings of the version
        it runs (kept, about to be replaced, or kept by a stopped rollout alike)."""
        targets = {}
        for current in observed.of_garden(plan.garden).workers:
            if current.phase == Phase.READY and not current.in_flight:
                liveness = current.spec.liveness
                targets[current.worker_id] = (liveness.period, liveness.failure_threshold)
        with self.lock:
            self.targets = targets
            self.failures = {w: n for w, n in self.failures.items() if w in targets}

    def run(self) -> None:
        watcher = self.watcher
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe") as pool:
            while not watcher.stop.wait(watcher.options.tick):
                try:
                    self._probe_due(pool)
                except Exception as exc:  # noqa: BLE001 - liveness must outlive a bad probe
                    watcher.log.emit("error", f"liveness probing failed (a bug in gardenctl, "
                                     f"please report it): {type(exc).__name__}: {exc}")

    def _probe_due(self, pool: ThreadPoolExecutor) -> None:
        watcher = self.watcher
        runtime = watcher.session.runtime
        if runtime is None:
            return
        now = time.monotonic()
        with self.lock:
            due = [w for w in self.targets if self.next_probe.get(w, 0.0) <= now]
            for worker_id in due:
                self.next_probe[worker_id] = now + self.targets[worker_id][0]
        busy = watcher.in_flight()
        due = [w for w in due if w not in busy]
        for worker_id, problem in zip(due, pool.map(_probe(runtime), due), strict=True):
            self._count(worker_id, problem)

    def _count(self, worker_id: str, problem: str | None) -> None:
        with self.lock:
            if worker_id not in self.targets:
                return
            threshold = self.targets[worker_id][1]
            if problem is None:
                self.failures.pop(worker_id, None)
                return
            failures = self.failures.get(worker_id, 0) + 1
            self.failures[worker_id] = failures
        watcher = self.watcher
        if failures < threshold:
            watcher.log.emit("probe", f"liveness probe failed ({failures}/{threshold}): "
                             f"{problem}", worker=worker_id)
            return
        detail = f"{problem} ({failures} probes in a row)"
        runtime = watcher.session.runtime
        if runtime is not None:
            runtime.mark_unhealthy(worker_id, detail)
        with self.lock:
            self.failures.pop(worker_id, None)
            self.targets.pop(worker_id, None)
        watcher.log.emit("unhealthy", detail, worker=worker_id)
        watcher.triggers.put("worker unhealthy")


def _probe(runtime: Runtime) -> Callable[[str], str | None]:
    """One worker's liveness probe; a probe that raises counts as a failed probe."""
    def probe(worker_id: str) -> str | None:
        try:
            return runtime.probe_health(worker_id)
        except Exception as exc:  # noqa: BLE001 - reported as the probe's failure
            return f"the probe failed: {type(exc).__name__}: {exc}"
    return probe


__all__ = ["WatchOptions", "Watcher"]

