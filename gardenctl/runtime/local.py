"""The local runtime: each worker is a process group on this machine, with a record and a log.

- spawn: an argv list (never a shell), its own session (so the whole group can be signalled),
  stdout+stderr to a log file rotated per start, our marker in its environment, a record
  written atomically right after the process exists.
- check: process identity (pid + start time) first, then /health and /v1/models.
- stop: SIGTERM to the main process, wait the grace period, SIGKILL the group, verify that no
  member survives (vLLM's EngineCore and TP workers can outlive a killed main process).
- observe: records + identity checks + a scan for marked processes that have no record.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping

from gardenctl.observe import CRASHED, READY, STARTING, STOPPED, UNKNOWN, Observed, ObservedWorker
from gardenctl.runtime import base
from gardenctl.runtime import processes as procs
from gardenctl.runtime.diagnose import UNKNOWN as UNKNOWN_CAUSE
from gardenctl.runtime.diagnose import diagnose
from gardenctl.runtime.health import latest_milestone, probe_ready
from gardenctl.spec.models import env_reference
from gardenctl.state import StateDir, WorkerRecord
from gardenctl.workers import MARKER_ENVS, SPEC_HASH_ENV, STATE_ENV, WORKER_ID_ENV, DesiredWorker

LOG_TAIL_BYTES = 16 * 1024
STOP_MARGIN = 10.0  # seconds beyond the worker's shutdown_timeout before SIGKILL
KILL_WAIT = 5.0
STRIPPED_ENV = ("CUDA_VISIBLE_DEVICES", "VLLM_PORT", *MARKER_ENVS)


def resolve_command(argv0: str) -> str:
    """The executable for ``argv0``: a path as given, else next to gardenctl's own Python (a
    vLLM installed in the same virtualenv), else on PATH."""
    if os.sep in argv0:
        if os.access(argv0, os.X_OK) and not os.path.isdir(argv0):
            return argv0
        raise base.SpawnError("command_not_found", f"{argv0} is not an executable file")
    beside = Path(sys.executable).parent / argv0
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(argv0)
    if found:
        return found
    raise base.SpawnError(
        "command_not_found",
        f"`{argv0}` was not found next to gardenctl's Python ({Path(sys.executable).parent}) or "
        "on PATH. Install vLLM there (pip install 'gardenctl[vllm]') or set vllm_command to its "
        "full path.",
    )


def read_tail(path: str | None, limit: int = LOG_TAIL_BYTES) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def last_lines(text: str, count: int = 20) -> str:
    return "\n".join(text.splitlines()[-count:])


class LocalRuntime:
    name = "local"

    def __init__(self, state: StateDir, node: str, *, environ: Mapping[str, str] | None = None,
                 probe: Callable[..., bool] = probe_ready, probe_timeout: float = 1.0,
                 writable: bool = True) -> None:
        """``writable``: this runtime's owner holds the state lock and may update records
        (phases seen while observing); read-only commands (plan, status) pass False."""
        self.state = state
        self.node = node
        self.writable = writable
        self.environ = environ if environ is not None else os.environ
        self.probe = probe
        self.probe_timeout = probe_timeout
        self._children: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    @property
    def state_id(self) -> str:
        """Marks this state directory's workers (so two state directories never mix)."""
        return str(self.state.root.resolve())

    # -- spawn -----------------------------------------------------------------------------

    def spawn(self, worker: DesiredWorker, env: Mapping[str, str], restarts: int = 0) -> None:
        if worker.node != self.node:
            raise base.SpawnError("wrong_node", f"{worker.worker_id} is planned on node "
                                  f"{worker.node}, but the local runtime runs on {self.node}")
        executable = resolve_command(worker.argv[0])
        owner = procs.port_owner(worker.host, worker.port)
        if owner is not None:
            raise base.SpawnError("port_in_use", f"port {worker.port} on {worker.host} is already "
                                  f"in use by {owner}")
        self.state.ensure()
        log_path = self.state.new_log(worker.worker_id)
        full_env = {k: v for k, v in self.environ.items() if k not in STRIPPED_ENV}
        full_env.update(env)
        full_env.update({WORKER_ID_ENV: worker.worker_id, SPEC_HASH_ENV: worker.spec_hash,
                         STATE_ENV: self.state_id,
                         "PYTHONUNBUFFERED": "1"})
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            header = (f"=== gardenctl: starting {worker.worker_id} (spec {worker.spec_hash}) at "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} ===\n")
            os.write(fd, header.encode())
            try:
                child = subprocess.Popen(
                    [executable, *worker.argv[1:]], env=full_env, stdin=subprocess.DEVNULL,
                    stdout=fd, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                )
            except OSError as exc:
                raise base.SpawnError("spawn_failed", f"could not start {worker.argv[0]}: "
                                      f"{exc.strerror}") from None
        finally:
            os.close(fd)
        with self._lock:
            self._children[worker.worker_id] = child
        record = WorkerRecord(
            worker_id=worker.worker_id, garden=worker.garden, model=worker.model,
            replica=worker.replica, node=worker.node, gpus=list(worker.gpus), host=worker.host,
            port=worker.port, served_model_name=worker.served_model_name,
            utilization=worker.utilization, claim_bytes=worker.claim_bytes,
            spec_hash=worker.spec_hash, sizing_hash=worker.sizing_hash, argv=list(worker.argv),
            env={k: v for k, v in worker.env}, start_timeout=worker.start_timeout,
            shutdown_timeout=worker.shutdown_timeout, pid=child.pid, pgid=child.pid,
            started_at=time.time(), phase=STARTING, restarts=restarts, log_path=str(log_path),
        )
        _set_identity(record, procs.identity_of(child.pid))
        self.state.write_record(record)

    # -- check -----------------------------------------------------------------------------

    def check(self, worker_id: str) -> base.WorkerStatus:
        record = self.state.read_record(worker_id)
        if record is None:
            return base.WorkerStatus(base.EXITED, "no record")
        code = self._exit_code(record)
        if code is not _ALIVE:
            return self._mark_exited(record, code)
        api_key = self._api_key(record)
        if self.probe(record.host, record.port, record.served_model_name, api_key,
                      self.probe_timeout):
            if record.phase != READY:
                record.phase = READY
                record.ready_at = time.time()
                self._save(record)
            return base.WorkerStatus(base.READY, "ready")
        return base.WorkerStatus(base.STARTING, latest_milestone(read_tail(record.log_path)))

    def _exit_code(self, record: WorkerRecord):
        with self._lock:
            child = self._children.get(record.worker_id)
        if child is not None and child.pid == record.pid:
            code = child.poll()
            return _ALIVE if code is None else code
        identity = _identity(record)
        if identity is not None and identity.alive():
            return _ALIVE
        return record.exit_code  # not our child: the code is unknown unless recorded

    def _save(self, record: WorkerRecord) -> None:
        if self.writable:
            self.state.write_record(record)

    def _mark_exited(self, record: WorkerRecord, code: int | None) -> base.WorkerStatus:
        tail = last_lines(read_tail(record.log_path), 25)
        diagnosis = diagnose(tail)
        signal_number = -code if code is not None and code < 0 else None
        if record.phase not in (CRASHED, STOPPED):
            record.phase = CRASHED
            record.exit_code = code
            if signal_number:
                record.last_error = f"killed by signal {signal_number}"
            elif diagnosis.cause != UNKNOWN_CAUSE:
                record.last_error = diagnosis.message
            elif code is None:
                record.last_error = ("its process is gone (exit status unknown: it was not "
                                     "started by this gardenctl process)")
            else:
                record.last_error = f"exited with code {code}"
            self._save(record)
        return base.WorkerStatus(base.EXITED, record.last_error or "",
                                 exit_code=None if signal_number else code, signal=signal_number,
                                 log_tail=tail, diagnosis=diagnosis)

    def _api_key(self, record: WorkerRecord) -> str | None:
        value = record.env.get("VLLM_API_KEY")
        if value is None:
            return None
        ref = env_reference(value)
        return self.environ.get(ref) if ref else value

    # -- stop ------------------------------------------------------------------------------

    def stop(self, worker_id: str, grace: float | None = None) -> base.StopResult:
        """Stop every process of the worker: its recorded group and any marked group with its
        id (an orphan left by an interrupted gardenctl). Only processes proven to be the worker
        (identity or marker) are ever signalled."""
        record = self.state.read_record(worker_id)
        if grace is None:
            grace = (record.shutdown_timeout if record else 30.0) + STOP_MARGIN
        leaders: dict[int, procs.Identity] = {}  # verified alive and ours
        recorded = _identity(record) if record is not None else None
        if record is not None and recorded is not None and self._exit_code(record) is _ALIVE:
            leaders[recorded.pid] = recorded
        for marked in procs.marked_group_leaders(self.state_id):
            if marked.worker_id == worker_id:
                leaders.setdefault(marked.pid, marked.identity)
        groups: dict[int, procs.Identity | None] = {pid: ident for pid, ident in leaders.items()}
        if record is not None and record.pgid:
            groups.setdefault(record.pgid, recorded)

        def members_now() -> set[int]:
            return {pid for pgid, leader in groups.items()
                    for pid in procs.group_members(pgid, worker_id, leader)}

        members = members_now()
        if not leaders and not members:
            self._reap(worker_id)
            self.state.delete_record(worker_id)
            return base.StopResult("gone")
        outcome = "stopped"
        for pid in leaders:
            procs.signal_process(pid, signal.SIGTERM)
        if leaders and not self._wait_gone(list(leaders.values()), grace):
            outcome = "killed"
        survivors = members_now()
        if survivors:
            outcome = "killed"
            procs.kill_members(sorted(survivors))
            deadline = time.monotonic() + KILL_WAIT
            while survivors and time.monotonic() < deadline:
                time.sleep(0.05)
                survivors = members_now()
            if survivors:
                raise base.StopError(f"{worker_id}: processes {sorted(survivors)} survived "
                                     "SIGKILL")
        self._reap(worker_id)
        self.state.delete_record(worker_id)
        detail = ("exited after SIGTERM" if outcome == "stopped"
                  else "SIGKILLed its process group (it did not exit in time, or left "
                  "processes behind)")
        return base.StopResult(outcome, tuple(sorted(members | set(leaders))), detail)

    def _wait_gone(self, leaders: list[procs.Identity], grace: float) -> bool:
        deadline = time.monotonic() + grace
        while True:
            self._poll_children()
            if not any(leader.alive() for leader in leaders):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _poll_children(self) -> None:
        """Reap exited children we spawned, so they do not linger as zombies."""
        with self._lock:
            children = list(self._children.values())
        for child in children:
            child.poll()

    def _reap(self, worker_id: str) -> None:
        with self._lock:
            child = self._children.pop(worker_id, None)
        if child is not None:
            try:
                child.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass

    # -- records ---------------------------------------------------------------------------

    def adopt(self, worker: ObservedWorker, desired: DesiredWorker) -> None:
        """Record a worker found running by its marker, as the garden wants it (``desired``:
        same spec hash), so that it is managed like one this gardenctl started."""
        identity = procs.identity_of(worker.pid) if worker.pid is not None else None
        if identity is None:
            return
        record = WorkerRecord(
            worker_id=desired.worker_id, garden=desired.garden, model=desired.model,
            replica=desired.replica, node=desired.node, gpus=list(desired.gpus),
            host=desired.host, port=desired.port, served_model_name=desired.served_model_name,
            utilization=desired.utilization, claim_bytes=desired.claim_bytes,
            spec_hash=desired.spec_hash, sizing_hash=desired.sizing_hash,
            argv=list(desired.argv), env={k: v for k, v in desired.env},
            start_timeout=desired.start_timeout, shutdown_timeout=desired.shutdown_timeout,
            pid=identity.pid, pgid=identity.pid, started_at=identity.create_time,
            log_path=str(self.state.log_path(desired.worker_id)),
        )
        _set_identity(record, identity)
        ready = self.probe(record.host, record.port, record.served_model_name,
                           self._api_key(record), self.probe_timeout)
        record.phase = READY if ready else STARTING
        self.state.write_record(record)

    def log_path(self, worker_id: str) -> str | None:
        record = self.state.read_record(worker_id)
        if record is not None and record.log_path:
            return record.log_path
        path = self.state.log_path(worker_id)
        return str(path) if path.exists() else None

    def dead_workers(self) -> set[tuple[str, int | None]]:
        dead = set()
        for record in self.state.records(damaged=[]):
            if record.phase in (STARTING, READY) and self._exit_code(record) is not _ALIVE:
                dead.add((record.worker_id, record.pid))
        return dead

    # -- observe ---------------------------------------------------------------------------

    def observe(self) -> Observed:
        damaged: list[str] = []
        records = self.state.records(damaged=damaged)
        with ThreadPoolExecutor(max_workers=min(16, max(1, len(records)))) as pool:
            workers = list(pool.map(self._observe_record, records))
        recorded = {(r.worker_id, r.pid) for r in records}
        by_id = {w.worker_id: w for w in workers}
        notes = [f"ignored: {problem}" for problem in damaged]
        for marked in procs.marked_group_leaders(self.state_id):
            if (marked.worker_id, marked.pid) in recorded:
                continue
            orphan = _orphan(marked, self.node)
            if orphan is None:
                continue
            known = by_id.get(orphan.worker_id)
            if known is not None and known.running:
                notes.append(f"{orphan.worker_id}: a second process (pid {orphan.pid}) carries "
                             "its marker; stopping the worker stops both")
                continue
            by_id[orphan.worker_id] = orphan  # replaces a record whose process is gone
        workers = sorted(by_id.values(), key=lambda w: w.worker_id)
        return Observed(tuple(workers), source=f"local runtime, state {self.state.root}",
                        notes=tuple(notes))

    def _observe_record(self, record: WorkerRecord) -> ObservedWorker:
        code = self._exit_code(record)
        pids: tuple[int, ...] = ()
        if code is _ALIVE:
            ready = self.probe(record.host, record.port, record.served_model_name,
                               self._api_key(record), min(self.probe_timeout, 0.5))
            phase = READY if ready else (STARTING if record.phase == STARTING else UNKNOWN)
            if ready and record.phase != READY:
                record.phase = READY
                record.ready_at = time.time()
                self._save(record)
            pids = tuple(procs.group_members(record.pgid, record.worker_id, _identity(record))
                         ) if record.pgid else ()
            exit_code, last_error = None, None
        else:
            if record.phase not in (CRASHED, STOPPED):
                self._mark_exited(record, code)
            phase = STOPPED if record.phase == STOPPED else CRASHED
            exit_code, last_error = record.exit_code, record.last_error
            # EngineCore or TP workers can outlive a killed main process, holding GPU memory
            pids = tuple(procs.group_members(record.pgid, record.worker_id)) if record.pgid else ()

        return ObservedWorker(
            worker_id=record.worker_id, garden=record.garden, model=record.model,
            replica=record.replica, node=record.node, gpus=tuple(record.gpus), port=record.port,
            utilization=record.utilization, claim_bytes=record.claim_bytes,
            spec_hash=record.spec_hash, sizing_hash=record.sizing_hash, argv=tuple(record.argv),
            phase=phase, pid=record.pid, has_record=True, restarts=record.restarts,
            started_at=record.started_at, exit_code=exit_code, last_error=last_error, pids=pids,
            env=tuple(sorted(record.env.items())),
        )


_ALIVE = object()


def _identity(record: WorkerRecord) -> procs.Identity | None:
    if record.pid is None:
        return None
    return procs.Identity(record.pid, record.create_time, record.start_ticks)


def _set_identity(record: WorkerRecord, identity: procs.Identity | None) -> None:
    if identity is not None:
        record.create_time = identity.create_time
        record.start_ticks = identity.start_ticks


def _flag(argv, name: str) -> str | None:
    argv = list(argv)
    for i, word in enumerate(argv[:-1]):
        if word == name:
            return argv[i + 1]
    return None


def _orphan(marked: procs.MarkedProcess, node: str) -> ObservedWorker | None:
    parts = marked.worker_id.split("/")
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    argv = marked.cmdline
    port = _flag(argv, "--port")
    utilization = _flag(argv, "--gpu-memory-utilization")
    gpus = tuple(int(g) for g in marked.cuda_visible_devices.split(",") if g.strip().isdigit())
    return ObservedWorker(
        worker_id=marked.worker_id, garden=parts[0], model=parts[1], replica=int(parts[2]),
        node=node, gpus=gpus, port=int(port) if port and port.isdigit() else 0,
        utilization=float(utilization) if utilization else 0.0, claim_bytes=0,
        spec_hash=marked.spec_hash, sizing_hash="", argv=argv, phase=UNKNOWN, pid=marked.pid,
        has_record=False, started_at=marked.identity.create_time, pids=(marked.pid,),
    )
