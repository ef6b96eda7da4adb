"""The state directory: one record per worker, its logs, and the writers' lock.

Layout (directories 0700, files 0600; records written temp + fsync + rename):

    <state>/lock                                     flock'ed by apply, down and watch
    <state>/gardens/<garden>/workers/<model>.<replica>.json
    <state>/gardens/<garden>/logs/<model>.<replica>.log   (.1, .2 ... older runs)

<state> is --state-dir, else $GARDENCTL_STATE_DIR, else $XDG_STATE_HOME/gardenctl, else
~/.local/state/gardenctl. gardenctl keeps nothing in memory it cannot rebuild from here and from
the processes themselves.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

from gardenctl.errors import LockHeldError, StateError
from gardenctl.files import write_json_atomic

RECORD_VERSION = 1
LOGS_KEPT = 3


def default_state_dir() -> Path:
    explicit = os.environ.get("GARDENCTL_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "gardenctl"


@dataclass
class WorkerRecord:
    """What gardenctl knows about one worker it started (no secret values: env holds refs)."""

    worker_id: str
    garden: str
    model: str
    replica: int
    node: str
    gpus: list[int]
    host: str
    port: int
    served_model_name: str
    utilization: float
    claim_bytes: int
    spec_hash: str
    sizing_hash: str
    argv: list[str]
    env: dict[str, str]
    start_timeout: float
    shutdown_timeout: float
    pid: int | None = None
    pgid: int | None = None
    create_time: float | None = None  # the process's start (wall clock)
    start_ticks: int | None = None  # and in clock ticks since boot: a reused pid never matches
    started_at: float | None = None
    ready_at: float | None = None
    phase: str = "starting"  # starting | ready | stopped | crashed
    exit_code: int | None = None
    last_error: str | None = None
    restarts: int = 0
    log_path: str | None = None
    version: int = RECORD_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "WorkerRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _split(worker_id: str) -> tuple[str, str]:
    garden, model, replica = worker_id.split("/")
    return garden, f"{model}.{replica}"


class StateDir:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_state_dir()

    def ensure(self) -> "StateDir":
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
        except OSError as exc:
            raise StateError(f"cannot use state directory {self.root}: {exc.strerror}") from None
        return self

    def _private_dir(self, *parts: str) -> Path:
        path = self.root
        for part in parts:  # each level 0700 (mkdir with parents=True would not do that)
            path = path / part
            path.mkdir(mode=0o700, exist_ok=True)
        return path

    def _garden_dir(self, garden: str, kind: str) -> Path:
        return self._private_dir("gardens", garden, kind)

    def garden_file(self, garden: str, name: str) -> Path:
        """A file of the garden's own, e.g. watch.json (its folder is created 0700)."""
        return self._private_dir("gardens", garden) / name

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
        path = self.log_path(worker_id)
        for n in range(LOGS_KEPT - 1, 0, -1):
            older = path.with_name(f"{path.name}.{n}")
            if older.exists():
                older.replace(path.with_name(f"{path.name}.{n + 1}"))
        if path.exists():
            path.replace(path.with_name(f"{path.name}.1"))
        return path

    def write_record(self, record: WorkerRecord) -> None:
        self.ensure()
        write_json_atomic(self.record_path(record.worker_id), record.to_json())

    def delete_record(self, worker_id: str) -> None:
        try:
            self.record_path(worker_id).unlink()
        except FileNotFoundError:
            pass

    def read_record(self, worker_id: str) -> WorkerRecord | None:
        return self._read(self.record_path(worker_id))

    def records(self, garden: str | None = None,
                damaged: list[str] | None = None) -> list[WorkerRecord]:
        """Every readable record; a damaged one is skipped (and named in ``damaged``) so that
        one bad file never blocks the other workers. Its worker, if it runs, carries our
        marker and is found as an orphan."""
        base = self.root / "gardens"
        if not base.is_dir():
            return []
        gardens = [garden] if garden else sorted(p.name for p in base.iterdir() if p.is_dir())
        found = []
        for name in gardens:
            directory = base / name / "workers"
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
        except (ValueError, TypeError, OSError) as exc:
            raise StateError(f"the worker record {path} is damaged ({exc}); if its worker is "
                             "gone, delete the file") from None

    @contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the writers' lock for the duration; fail fast, naming the holder, if taken."""
        self.ensure()
        path = self.root / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise LockHeldError(self._holder_message(path)) from None
            os.ftruncate(fd, 0)
            info = {"pid": os.getpid(), "command": command, "since": time.time()}
            os.pwrite(fd, json.dumps(info).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing releases the flock

    def _holder_message(self, path: Path) -> str:
        try:
            info = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        since = info.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
        return (f"another gardenctl holds the lock on {self.root}: pid {info.get('pid', '?')}, "
                f"`{info.get('command', '?')}`, since {when}. Wait for it to finish (or stop it); "
                "only one apply, down or watch may change workers at a time.")
