"""`watch`: keep converging, level-based, on every save of the file and on a periodic resync.

Each pass re-reads the file (never trusting the event), re-observes reality, re-plans and
executes the plan. Triggers: a change of the garden file (its directory is watched, since editors
save by writing a temp file and renaming it; a burst of saves is debounced into one pass), a
worker's death (checked every second, cheaply), a crash-loop backoff expiring, and a jittered
resync (default 30 s) that catches any other drift.

A new version of the file is accepted only if it parses, validates, fits the GPUs, keeps the
garden's name, and does not stop every worker (unless --allow-empty). Otherwise the last good
version stays in force and keeps being converged. Both versions (content hashes) are reported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gardenctl.backoff import CrashTracker
from gardenctl.errors import GardenError, SpecError
from gardenctl.events import EventLog, iso_utc
from gardenctl.execute import ActionResult
from gardenctl.files import write_json_atomic
from gardenctl.plan.model import START, Plan
from gardenctl.session import Session
from gardenctl.spec.loader import LoadedGarden, parse_garden
from gardenctl.workflow import PlanResult

WATCH_FORMAT_VERSION = 1
POLL_INTERVAL = 0.25  # seconds, --poll


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
    liveness_interval: float = 1.0


class _Progress:
    """Executor progress -> one event when a worker begins to stop or start."""

    def __init__(self, log: EventLog) -> None:
        self.log = log

    def update(self, worker_id: str, phase: str, detail: str, elapsed: float) -> None:
        if phase == "stopping":
            self.log.emit("stopping", "stopping the worker", worker=worker_id)
        elif phase == "spawning":
            self.log.emit("starting", "spawning the worker", worker=worker_id)


class Watcher:
    def __init__(self, session: Session, options: WatchOptions, log: EventLog, *,
                 wall=time.time, rng: random.Random | None = None) -> None:
        self.session = session
        self.options = options
        self.log = log
        self.wall = wall
        self.rng = rng or random.Random()
        self.stop = threading.Event()
        self.interrupt = threading.Event()  # cut a pass short: a newer file version is waiting
        self.triggers: queue.Queue[str] = queue.Queue()
        self.tracker = CrashTracker()
        self.last_good: LoadedGarden | None = None
        self.last_attempted: tuple[str, float, bool, str | None] | None = None
        self.last_applied: tuple[str, float] | None = None
        self.seen_dead: set[tuple[str, int | None]] = set()
        self.started_at = wall()
        self._held_logged: dict[str, float] = {}
        self.rejected: tuple[str, LoadedGarden, str] | None = None  # digest, version, why
        self.invalid_digest: str | None = None
        self._waiting_logged = False
        self.stop_reason: str | None = None
        self._specs: dict[str, str] = {}
        self.pass_started = wall()

    # -- the loop --------------------------------------------------------------------------

    def request_stop(self, reason: str | None = None) -> None:
        """Safe in a signal handler: sets flags only; the loop logs the reason as it ends."""
        self.stop_reason = reason
        self.stop.set()
        self.interrupt.set()

    def run(self) -> None:
        mode = "polling" if self.options.poll else "file events"
        self.log.emit("watching", f"{self.options.garden_path} ({mode}, resync every "
                      f"{self.options.resync:g}s)", pid=os.getpid())
        files = threading.Thread(target=self._watch_files, name="watch files", daemon=True)
        files.start()
        reason: str | None = "start"
        try:
            while reason is not None and not self.stop.is_set():
                self.interrupt.clear()
                self.pass_once(reason)
                reason = self._wait_for_trigger()
        finally:
            self.stop.set()
            if self.stop_reason:
                self.log.emit("signal", f"received {self.stop_reason}; stopping")
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
            for _ in watchfiles.watch(path.parent, watch_filter=only_the_garden,
                                      debounce=self.options.debounce_ms, step=50,
                                      stop_event=self.stop, recursive=False,
                                      raise_interrupt=False):
                self.triggers.put("file changed")
                self.interrupt.set()
        except Exception as exc:  # noqa: BLE001 - reported; resync keeps converging
            self.log.emit("error", f"file watching stopped ({type(exc).__name__}: {exc}); "
                          "changes are picked up at each resync")

    def _poll_file(self) -> None:
        """--poll: read the file every POLL_INTERVAL and compare contents (mtimes can be too
        coarse on network file systems to see two saves in one second)."""
        seen = _digest_of(self.options.garden_path)
        changed_at: float | None = None
        while not self.stop.wait(POLL_INTERVAL):
            digest = _digest_of(self.options.garden_path)
            if digest != seen:
                seen = digest
                changed_at = time.monotonic()  # wait for the burst to settle
            elif changed_at is not None and \
                    time.monotonic() - changed_at >= self.options.debounce_ms / 1000:
                changed_at = None
                self.triggers.put("file changed")
                self.interrupt.set()

    def _wait_for_trigger(self) -> str | None:
        resync_at = self.wall() + self.options.resync * self.rng.uniform(
            1 - self.options.jitter, 1 + self.options.jitter)
        due = self.tracker.next_due(self.pass_started)
        while not self.stop.is_set():
            try:
                reason = self.triggers.get(timeout=self.options.liveness_interval)
                while not self.triggers.empty():
                    self.triggers.get_nowait()
                return reason
            except queue.Empty:
                pass
            now = self.wall()
            if now >= resync_at:
                return "resync"
            if due is not None and now >= due:
                return "backoff expired"
            runtime = self.session.runtime
            if runtime is not None:
                dead = runtime.dead_workers() - self.seen_dead
                if dead:
                    self.seen_dead |= dead
                    names = ", ".join(sorted(w for w, _ in dead))
                    self.log.emit("exited", f"worker process gone: {names}")
                    return "worker exited"
        return None

    # -- one pass --------------------------------------------------------------------------

    def pass_once(self, reason: str) -> None:
        """One pass; whatever goes wrong, the watcher lives on and keeps the last good garden."""
        self.pass_started = self.wall()
        try:
            self._pass(reason)
        except GardenError as exc:
            self.log.emit("error", f"pass failed: {exc}", reason=reason)
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the healing
            self.log.emit("error", f"internal error in this pass (a bug in gardenctl, please "
                          f"report it): {type(exc).__name__}: {exc}", reason=reason)
        self._write_status()

    def _pass(self, reason: str) -> None:
        candidate = self._read_candidate()
        result = None
        observed = None  # one snapshot of the workers per pass
        if candidate is not None:
            digest = candidate.content_hash
            try:
                result = self.session.plan_loaded(candidate, self.options.inventory_path)
                observed = result.observed
                refusal = self._refusal(candidate, result)
            except GardenError as exc:
                refusal = f"version {digest[:12]} cannot be planned: {exc}"
            if refusal:
                self._reject(candidate, refusal)
                result = None
            else:
                refused_before = self.last_attempted is not None and not self.last_attempted[2]
                self.rejected = None
                self._attempted(digest, accepted=True, error=None)
                if (self.last_good is None or refused_before
                        or digest != self.last_good.content_hash):
                    self.log.emit("accepted", f"garden file version {digest[:12]} ({reason})",
                                  version=digest[:12])
                self.last_good = candidate
        if result is None:
            if self.last_good is None:
                if not self._waiting_logged:
                    self._waiting_logged = True
                    self.log.emit("waiting", "no valid garden file yet; nothing is changed")
                return
            result = self.session.plan_loaded(self.last_good, self.options.inventory_path,
                                              observed)
        self._execute(result, reason)

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
        wanted = sum(1 for a in plan.actions if a.worker is not None)
        running = sum(1 for w in result.observed.of_garden(garden.name).workers if w.running)
        if wanted == 0 and running and not self.options.allow_empty:
            return (f"version {candidate.content_hash[:12]} would stop all {running} worker(s); "
                    "pass --allow-empty to allow that")
        return None

    def _execute(self, result: PlanResult, reason: str) -> None:
        now = self.wall()
        self.tracker.observe(result.observed.of_garden(result.plan.garden), now)
        wanted = {a.worker_id for a in result.plan.actions}
        self.tracker.forget(wanted | {u.worker_id for u in result.plan.unplaced})
        plan = self._without_held(result.plan, now)
        if plan.has_changes:
            s = plan.summary()
            self.log.emit("plan", f"{s['start']} to start, {s['replace']} to replace, {s['stop']} "
                          f"to stop, {s['keep']} unchanged ({reason})", reason=reason, **s)
        causes = {a.worker_id: a.cause for a in plan.actions}
        self._specs = {a.worker_id: a.worker.spec_hash for a in plan.actions if a.worker}
        self.session.apply(dataclasses.replace(result, plan=plan), _Progress(self.log),
                           stop_event=self.interrupt,
                           on_result=lambda r: self._result(r, causes.get(r.worker_id, "")))
        if self.last_good is not None:
            self.last_applied = (self.last_good.content_hash, self.wall())

    def _result(self, r: ActionResult, cause: str) -> None:
        """One event line per action, as soon as its outcome is known."""
        status = "ok" if r.ok else "failed"
        self.log.emit(r.action, f"{status}: {r.message}" + (f" ({cause})" if cause else ""),
                      worker=r.worker_id, ok=r.ok, outcome=r.outcome, cause=r.cause,
                      elapsed_s=round(r.elapsed, 3))
        if r.ok or r.action not in ("start", "replace"):
            return
        self.tracker.start_failed(r.worker_id, self.wall(), r.message, self._specs.get(r.worker_id))
        held = self.tracker.held(r.worker_id, self.wall())
        if held:
            entry = self.tracker.workers[r.worker_id]
            self._held_logged[r.worker_id] = entry.not_before
            self.log.emit("backoff", f"next start in {held:.0f}s ({entry.failures} failures in a "
                          "row)", worker=r.worker_id, seconds=round(held, 1),
                          failures=entry.failures)

    def _without_held(self, plan: Plan, now: float) -> Plan:
        """The plan minus starts of workers in crash-loop backoff (reported, not forgotten)."""
        kept = []
        for action in plan.actions:
            if action.worker is not None:  # a new version of a failing worker starts afresh
                self.tracker.reset_if_changed(action.worker_id, action.worker.spec_hash)
            held = self.tracker.held(action.worker_id, now) if action.action == START else None
            if held is None:
                kept.append(action)
                continue
            until = self.tracker.workers[action.worker_id].not_before
            if self._held_logged.get(action.worker_id) != until:
                self._held_logged[action.worker_id] = until
                entry = self.tracker.workers[action.worker_id]
                self.log.emit("backoff", f"failed {entry.failures} time(s) in a row; next start "
                              f"in {held:.0f}s (last error: {entry.last_error})",
                              worker=action.worker_id, seconds=round(held, 1),
                              failures=entry.failures)
        return dataclasses.replace(plan, actions=tuple(kept))

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
            "backoff": self.tracker.to_json(now),
        }
        path = self.session.state.garden_file(garden, "watch.json")
        write_json_atomic(path, document)
