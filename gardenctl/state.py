"""The state directory: one record per worker, its logs, the gardens' locks and history.

Layout (directories 0700, files 0600; records written temp + fsync + rename):

    <state>/gpus.lock                                 flock'ed for the instant of a spawn
    <state>/gardens/<garden>/lock                     flock'ed by apply, down and watch
    <state>/gardens/<garden>/history.json             what was last applied, and last `down`
    <state>/gardens/<garden>/lessons.json             what failed starts taught (resizes)
    <state>/gardens/<garden>/workers/<model>.<replica>.json
    <state>/gardens/<garden>/logs/<model>.<replica>.log   (.1, .2 ... older runs)

<state> is --state-dir, else $GARDENCTL_STATE_DIR, else $XDG_STATE_HOME/gardenctl, else
~/.local/state/gardenctl. gardenctl keeps nothing in memory it cannot rebuild from here and from
the processes themselves.

Each garden has its own lock, so a `watch` of one garden never blocks `apply` or `down` of
another. Gardens may still share GPUs: the brief `gpus.lock` makes "is a worker of any garden
loading on this GPU? if not, spawn" one atomic step (vLLM must never start two instances on one
GPU at once).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gardenctl.errors import LockHeldError, StateError
from gardenctl.files import rotate, write_json_atomic
from gardenctl.lessons import Lesson
from gardenctl.observe import History, ObservedWorker, Rejection
from gardenctl.phases import check_transition, ended_phase
from gardenctl.plan.model import Launch
from gardenctl.vocab import Cause, Phase
from gardenctl.workers import DesiredWorker

RECORD_VERSION = 2
LOGS_KEPT = 3


def default_state_dir() -> Path:
    explicit = os.environ.get("GARDENCTL_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "gardenctl"


@dataclass
class WorkerRecord:
    """What gardenctl knows of one worker it started (no secret values: env holds refs)."""

    spec: DesiredWorker  # the version this run is
    phase: Phase = Phase.STARTING
    pid: int | None = None
    pgid: int | None = None
    create_time: float | None = None  # the process's start (wall clock)
    start_ticks: int | None = None  # and in clock ticks since boot: a reused pid never matches
    started_at: float | None = None
    ready_at: float | None = None
    exited_at: float | None = None
    exit_code: int | None = None
    last_error: str | None = None
    cause: Cause | None = None
    hint: str = ""
    restarts: int = 0
    streak: int = 0  # failed runs in a row before this one
    previous: DesiredWorker | None = None  # the version this run replaced, until it is ready
    rejected: Rejection | None = None  # a newer version that failed and was rolled back
    log_path: str | None = None
    # Numbers the diagnosis read from the log of a failed run (kv_needed_bytes, free_bytes,
    # suggested_max_model_len, during, ...): what the next attempt can learn from.
    facts: dict[str, Any] = field(default_factory=dict)
    version: int = RECORD_VERSION
    # The phase it had when read (not stored): a write succeeds only if the stored record is
    # still that run in that phase (compare-and-swap; see runtime.records).
    loaded_as: Phase | None = field(default=None, compare=False, repr=False)

    @property
    def worker_id(self) -> str:
        return self.spec.worker_id

    @property
    def garden(self) -> str:
        return self.spec.garden

    # -- the life of a run: every phase change goes through move_to (gardenctl.phases) ------

    @classmethod
    def begin(cls, spec: DesiredWorker, launch: Launch, *, pid: int, started_at: float,
              log_path: str, before: WorkerRecord | None = None) -> WorkerRecord:
        """The record of a run that was just spawned. A restart keeps why the run ``before``
        it ended (status shows it as the last error until this run ends)."""
        check_transition(None, Phase.STARTING)
        record = cls(spec=spec, phase=Phase.STARTING, pid=pid, pgid=pid, started_at=started_at,
                     restarts=launch.restarts, streak=launch.streak, previous=launch.replaces,
                     rejected=launch.rejected, log_path=log_path)
        if before is not None and launch.restarts:
            record.last_error, record.cause = before.last_error, before.cause
        return record

    @classmethod
    def failed_start(cls, spec: DesiredWorker, launch: Launch, *, reason: str, cause: Cause,
                     hint: str, at: float, before: WorkerRecord | None) -> WorkerRecord:
        """The record of a run that could not even begin (no process): FAILED, so that it is
        seen, counted by the backoff and, for a replacement, rolled back."""
        check_transition(before.phase if before else None, Phase.FAILED)
        return cls(spec=spec, phase=Phase.FAILED, started_at=at, exited_at=at,
                   last_error=reason, cause=cause, hint=hint, restarts=launch.restarts,
                   streak=launch.streak, previous=launch.replaces, rejected=launch.rejected)

    def move_to(self, phase: Phase) -> None:
        self.phase = check_transition(self.phase, phase)

    def mark_ready(self, at: float) -> None:
        self.move_to(Phase.READY)
        self.ready_at = at
        self.previous = None  # the rollout of this replica succeeded: nothing to roll back

    def mark_ended(self, at: float, *, exit_code: int | None, error: str, cause: Cause,
                   hint: str = "", facts: dict[str, Any] | None = None) -> None:
        """The run is over (exited, or stopped to be started again)."""
        self.move_to(ended_phase(self.ready_at is not None))
        self.exited_at = at
        self.exit_code = exit_code
        self.last_error = error
        self.cause = cause
        self.hint = hint
        self.facts = dict(facts or {})

    def mark_unhealthy(self, detail: str) -> None:
        self.move_to(Phase.UNHEALTHY)
        self.last_error = f"unhealthy: {detail}"
        self.cause = Cause.UNHEALTHY

    def observed(self, phase: Phase, pids: tuple[int, ...] = (), *, in_flight: bool = False,
                 health: str = "") -> ObservedWorker:
        """The worker this record describes, in ``phase`` as observed now (the one conversion
        from a record to what the planner sees)."""
        return ObservedWorker(
            spec=self.spec, phase=phase, pid=self.pid, pids=pids, has_record=True,
            restarts=self.restarts, streak=self.streak, started_at=self.started_at,
            ready_at=self.ready_at, exited_at=self.exited_at, exit_code=self.exit_code,
            last_error=self.last_error, cause=self.cause, hint=self.hint,
            previous=self.previous, rejected=self.rejected, in_flight=in_flight, health=health,
            facts=tuple(sorted(self.facts.items())),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION, "spec": self.spec.to_json(), "phase": self.phase.value,
            "pid": self.pid, "pgid": self.pgid, "create_time": self.create_time,
            "start_ticks": self.start_ticks, "started_at": self.started_at,
            "ready_at": self.ready_at, "exited_at": self.exited_at, "exit_code": self.exit_code,
            "last_error": self.last_error, "cause": self.cause.value if self.cause else None,
            "hint": self.hint, "restarts": self.restarts, "streak": self.streak,
            "previous": self.previous.to_json() if self.previous else None,
            "rejected": self.rejected.to_json() if self.rejected else None,
            "log_path": self.log_path, "facts": self.facts,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerRecord:
        """A record of this version, or of version 1 (written by gardenctl 0.1, flat)."""
        if "spec" not in data:
            return _from_version_1(data)
        previous = data.get("previous")
        cause = data.get("cause")
        phase = Phase(data["phase"])
        return cls(
            spec=DesiredWorker.from_json(data["spec"]), phase=phase, loaded_as=phase,
            pid=data.get("pid"), pgid=data.get("pgid"), create_time=data.get("create_time"),
            start_ticks=data.get("start_ticks"), started_at=data.get("started_at"),
            ready_at=data.get("ready_at"), exited_at=data.get("exited_at"),
            exit_code=data.get("exit_code"), last_error=data.get("last_error"),
            cause=Cause(cause) if cause else None, hint=str(data.get("hint") or ""),
            restarts=int(data.get("restarts", 0)), streak=int(data.get("streak", 0)),
            previous=DesiredWorker.from_json(previous) if previous else None,
            rejected=Rejection.from_json(data.get("rejected")), log_path=data.get("log_path"),
            facts=_facts(data.get("facts")),
        )


def _facts(data: object) -> dict[str, Any]:
    """Failure facts as stored: numbers and short words only (anything else is dropped)."""
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items()
            if (isinstance(v, (int, float)) and not isinstance(v, bool))
            or (isinstance(v, str) and len(v) <= 64)}


def _from_version_1(data: dict[str, Any]) -> WorkerRecord:
    argv = list(data["argv"])
    spec_data = dict(data)
    spec_data["model_ref"] = argv[argv.index("serve") + 1] if "serve" in argv[:-1] else ""
    phase = {"ready": Phase.READY, "starting": Phase.STARTING}.get(data.get("phase", ""),
                                                                   Phase.CRASHED)
    return WorkerRecord(
        spec=DesiredWorker.from_json(spec_data), phase=phase, loaded_as=phase,
        pid=data.get("pid"),
        pgid=data.get("pgid"), create_time=data.get("create_time"),
        start_ticks=data.get("start_ticks"), started_at=data.get("started_at"),
        ready_at=data.get("ready_at"), exit_code=data.get("exit_code"),
        last_error=data.get("last_error"), restarts=int(data.get("restarts", 0)),
        log_path=data.get("log_path"),
    )


def lock_holder_message(garden: str, where: str, info: dict[str, Any]) -> str:
    """Who holds a garden's writer lock (``info``: what the holder wrote of itself: host, pid,
    command, since; any may be missing), for the error of the one refused."""
    since = info.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    host = f"{info['host']} " if info.get("host") else ""
    return (f"another gardenctl holds the lock of garden {garden} in {where}: {host}pid "
            f"{info.get('pid', '?')}, `{info.get('command', '?')}`, since {when}. Wait for it "
            "to finish (or stop it); only one apply, down or watch may change a garden's "
            "workers at a time.")


@dataclass(frozen=True)
class StandbyView:
    """The gateway's view of one standby worker: awake, asleep, waking or sleeping (being put
    to sleep), how often it was woken, when last, and how long that wake-up took."""

    state: str
    wakes: int = 0
    last_wake: float | None = None  # wall time the last wake-up finished
    last_wake_s: float | None = None  # how long it took
    pid: int | None = None  # the worker's process this is about (a restart starts afresh)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "wakes": self.wakes, "last_wake": self.last_wake,
                "last_wake_s": self.last_wake_s, "pid": self.pid}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StandbyView:
        return cls(str(data["state"]), int(data.get("wakes") or 0), data.get("last_wake"),
                   data.get("last_wake_s"), data.get("pid"))


def _one_part(garden: str) -> str:
    """A garden name as a folder name: never a path out of the state directory (the spec's
    name pattern is checked before; this is the last line)."""
    if not garden or garden in (".", "..") or "/" in garden or "\0" in garden:
        raise ValueError(f"not a garden name: {garden!r}")
    return garden


def _split(worker_id: str) -> tuple[str, str]:
    garden, model, replica = worker_id.split("/")
    return garden, f"{model}.{replica}"


class StateDir:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_state_dir()

    def ensure(self) -> StateDir:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
        except OSError as exc:
            raise StateError(f"cannot use state directory {self.root}: {exc.strerror}") from None
        return self

    @property
    def exists(self) -> bool:
        """Has anything ever been started here? (read-only commands create nothing)"""
        return (self.root / "gardens").is_dir()

    def _private_dir(self, *parts: str) -> Path:
        path = self.root
        for part in parts:  # each level 0700 (mkdir with parents=True would not do that)
            path = path / part
            path.mkdir(mode=0o700, exist_ok=True)
        return path

    def _garden_dir(self, garden: str, kind: str) -> Path:
        return self._private_dir("gardens", _one_part(garden), kind)

    def garden_file(self, garden: str, name: str) -> Path:
        """A file of the garden's own, e.g. watch.json (its folder is created 0700)."""
        return self._private_dir("gardens", _one_part(garden)) / name

    def gardens(self) -> list[str]:
        base = self.root / "gardens"
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def record_path(self, worker_id: str) -> Path:
        garden, stem = _split(worker_id)
        return self._garden_dir(garden, "workers") / f"{stem}.json"

    def log_path(self, worker_id: str) -> Path:
        """Where the worker's log is (nothing is created: read-only commands use it too)."""
        garden, stem = _split(worker_id)
        return self.root / "gardens" / garden / "logs" / f"{stem}.log"

    def new_log(self, worker_id: str) -> Path:
        """Rotate the worker's log (keeping LOGS_KEPT older runs) and return the fresh path."""
        garden, _ = _split(worker_id)
        self._garden_dir(garden, "logs")
        return rotate(self.log_path(worker_id), LOGS_KEPT)

    # -- records ---------------------------------------------------------------------------

    def write_record(self, record: WorkerRecord) -> None:
        self.ensure()
        write_json_atomic(self.record_path(record.worker_id), record.to_json())

    def delete_record(self, worker_id: str) -> None:
        try:
            self.record_path(worker_id).unlink()
        except FileNotFoundError:
            pass

    def read_record(self, worker_id: str) -> WorkerRecord | None:
        garden, stem = _split(worker_id)
        return self._read(self.root / "gardens" / garden / "workers" / f"{stem}.json")

    def records(self, garden: str | None = None,
                damaged: list[str] | None = None) -> list[WorkerRecord]:
        """Every readable record; a damaged one is skipped (and named in ``damaged``) so that
        one bad file never blocks the other workers. Its worker, if it runs, carries our
        marker and is found as an orphan."""
        found = []
        for name in [garden] if garden else self.gardens():
            directory = self.root / "gardens" / name / "workers"
            if not directory.is_dir():
                continue
            for path in sorted(directory.glob("*.json")):
                try:
                    record = self._read(path)
                except StateError as exc:
                    if damaged is not None:
                        damaged.append(str(exc))
                    continue
                if record is not None:
                    found.append(record)
        return found

    @staticmethod
    def _read(path: Path) -> WorkerRecord | None:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise TypeError(f"a {type(data).__name__}, not a record")
            return WorkerRecord.from_json(data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError, OSError) as exc:
            raise StateError(f"the worker record {path} is damaged ({exc!r}); if its worker is "
                             "gone, delete the file") from None

    # -- history ---------------------------------------------------------------------------

    def read_history(self, garden: str) -> History:
        path = self.root / "gardens" / garden / "history.json"
        try:
            data = json.loads(path.read_text())
            return History.from_json(data) if isinstance(data, dict) else History()
        except (OSError, ValueError, TypeError):
            return History()

    def write_history(self, garden: str, history: History) -> None:
        write_json_atomic(self.garden_file(garden, "history.json"), history.to_json())

    def read_lessons(self, garden: str) -> dict[str, Lesson]:
        """What failed starts taught, by model (gardenctl.lessons); {} when none or unreadable."""
        path = self.root / "gardens" / _one_part(garden) / "lessons.json"
        try:
            data = json.loads(path.read_text())
            return {str(k): Lesson.from_json(v) for k, v in data.get("lessons", {}).items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return {}

    def write_lessons(self, garden: str, lessons: dict[str, Lesson]) -> None:
        document = {"lessons": {name: lessons[name].to_json() for name in sorted(lessons)}}
        write_json_atomic(self.garden_file(garden, "lessons.json"), document)

    # -- standby (written by the gateway, read by status) ------------------------------------

    def read_standby(self, garden: str) -> dict[str, StandbyView]:
        """What the gateway last said of each standby worker ({} when no gateway wrote)."""
        path = self.root / "gardens" / _one_part(garden) / "standby.json"
        try:
            data = json.loads(path.read_text())
            return {str(k): StandbyView.from_json(v) for k, v in data["workers"].items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return {}

    def write_standby(self, garden: str, views: dict[str, StandbyView]) -> None:
        document = {"workers": {k: views[k].to_json() for k in sorted(views)}}
        write_json_atomic(self.garden_file(garden, "standby.json"), document)

    def demand_path(self, garden: str) -> Path:
        return self.root / "gardens" / _one_part(garden) / "demand.json"

    def read_demand(self, garden: str) -> dict[str, float]:
        """The `standby: stop` workers a gateway wants running now: worker id -> when a request
        last needed it ({} when none, or unreadable)."""
        try:
            data = json.loads(self.demand_path(garden).read_text())
            return {str(k): float(v) for k, v in data["workers"].items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return {}

    def write_demand(self, garden: str, demand: dict[str, float]) -> None:
        document = {"workers": {k: demand[k] for k in sorted(demand)}}
        write_json_atomic(self.garden_file(garden, "demand.json"), document)

    # -- locks -----------------------------------------------------------------------------

    @contextmanager
    def lock(self, garden: str, command: str) -> Iterator[None]:
        """Hold the garden's writer lock for the duration; fail fast, naming the holder, if
        another apply, down or watch of the same garden has it."""
        path = self.garden_file(garden, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise LockHeldError(self._holder_message(path, garden)) from None
            os.ftruncate(fd, 0)
            info = {"pid": os.getpid(), "command": command, "since": time.time()}
            os.pwrite(fd, json.dumps(info).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing releases the flock

    @contextmanager
    def gpu_lock(self) -> Iterator[None]:
        """The brief lock around "check that no worker loads on these GPUs, then spawn" (all
        gardens of this state directory); blocks until free (it is held for milliseconds)."""
        self.ensure()
        fd = os.open(self.root / "gpus.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _holder_message(self, path: Path, garden: str) -> str:
        try:
            info = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        return lock_holder_message(garden, str(self.root), info)


__all__ = ["History", "StateDir", "WorkerRecord", "default_state_dir"]
