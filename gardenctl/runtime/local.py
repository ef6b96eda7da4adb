"""The local runtime: each worker is a process group on this machine, with a record and a log.

- spawn: an argv list (never a shell), its own session (so the whole group can be signalled),
  stdout+stderr to a log file rotated per start, a minimal environment (runtime.environment)
  with gardenctl's marker, a record written atomically right after the process exists. The
  check that no other worker loads on its GPUs and the spawn are one step under gpus.lock.
- check: process identity (pid + start time) first, then /health and /v1/models.
- stop: SIGTERM to the main process, wait the grace period, SIGKILL the group, verify that no
  member survives (vLLM's EngineCore and TP workers can outlive a killed main process).
- observe: records + identity checks + liveness + a scan for marked processes with no record.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Container, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gardenctl.argv import flag_value
from gardenctl.observe import Observed, ObservedWorker
from gardenctl.plan.model import Launch
from gardenctl.runtime import base, sleepmode
from gardenctl.runtime import processes as procs
from gardenctl.runtime.environment import worker_environment
from gardenctl.runtime.health import latest_milestone, probe_liveness, probe_ready
from gardenctl.runtime.records import ALIVE, RecordedRuntime, api_key_of
from gardenctl.state import StateDir, WorkerRecord
from gardenctl.vocab import Cause, Phase
from gardenctl.workers import SPEC_HASH_ENV, STATE_ENV, WORKER_ID_ENV, DesiredWorker

LOG_TAIL_BYTES = 16 * 1024
STOP_MARGIN = 10.0  # seconds beyond the worker's shutdown_timeout before SIGKILL


def resolve_command(argv0: str) -> str:
    """The executable for ``argv0``: a path as given, else next to gardenctl's own Python (a
    vLLM installed in the same virtualenv), else on PATH."""
    if os.sep in argv0:
        if os.access(argv0, os.X_OK) and not os.path.isdir(argv0):
            return argv0
        raise base.SpawnError(Cause.COMMAND_NOT_FOUND, f"{argv0} is not an executable file",
                              hint="set vllm_command to the full path of vLLM's `vllm`")
    beside = Path(sys.executable).parent / argv0
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(argv0)
    if found:
        return found
    raise base.SpawnError(
        Cause.COMMAND_NOT_FOUND,
        f"`{argv0}` was not found next to gardenctl's Python ({Path(sys.executable).parent}) or "
        "on PATH",
        hint="install vLLM there (pip install 'gardenctl[vllm]') or set vllm_command to its "
        "full path",
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


class LocalRuntime(RecordedRuntime):
    name = "local"

    def __init__(self, state: StateDir, node: str, *, environ: Mapping[str, str] | None = None,
                 probe: Callable[..., bool] = probe_ready, probe_timeout: float = 1.0,
                 writable: bool = True, clock: Callable[[], float] = time.time,
                 gardens: Container[str] | None = None) -> None:
        """``writable``: this runtime's owner holds the lock of ``gardens`` (None: of every
        garden) and may update their records (phases seen while observing); read-only
        commands (plan, status) pass False."""
        super().__init__(state, writable=writable, clock=clock, gardens=gardens)
        self.state = state
        self.node = node
        self.environ = environ if environ is not None else os.environ
        self.probe = probe
        self.probe_timeout = probe_timeout
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def _sleep_mode(self, record: WorkerRecord, action: str) -> bool | None:
        spec = record.spec
        level = spec.standby.level if spec.standby else 1
        return sleepmode.act(action, spec.host, spec.port, level,
                             api_key_of(record, self.environ))

    @property
    def state_id(self) -> str:
        """Marks this state directory's workers (so two state directories never mix)."""
        return str(self.state.root.resolve())

    # -- spawn -----------------------------------------------------------------------------

    def spawn(self, worker: DesiredWorker, env: Mapping[str, str], launch: Launch) -> None:
        if worker.node != self.node:  # recorded as a failed start: counted by the backoff
            error = base.SpawnError(Cause.SPAWN_FAILED, f"{worker.worker_id} is planned on node "
                                    f"{worker.node}, but the local runtime runs on {self.node}")
            self.fail(worker, launch, str(error), error.cause, error.hint)
            raise error
        with self.state.gpu_lock():
            self._check_gpus_free(worker)
            try:
                executable = resolve_command(worker.argv[0])
                owner = procs.port_owner(worker.host, worker.port)
                if owner is not None:
                    raise base.SpawnError(Cause.PORT_IN_USE, f"port {worker.port} on "
                                          f"{worker.host} is already in use by {owner}",
                                          hint="stop the other program, or give the model "
                                          "another port")
                child, log_path = self._start_process(worker, executable, env)
            except base.SpawnError as exc:
                self.fail(worker, launch, str(exc), exc.cause, exc.hint)
                raise
            with self._lock:
                self._children[worker.worker_id] = child
            record = WorkerRecord.begin(worker, launch, pid=child.pid, started_at=self.clock(),
                                        log_path=str(log_path),
                                        before=self.state.read_record(worker.worker_id))
            _set_identity(record, procs.identity_of(child.pid))
            self._record_new_run(record)

    def _start_process(self, worker: DesiredWorker, executable: str,
                       env: Mapping[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        self.state.ensure()
        log_path = self.state.new_log(worker.worker_id)
        full_env = worker_environment(self.environ, env, {
            WORKER_ID_ENV: worker.worker_id, SPEC_HASH_ENV: worker.spec_hash,
            STATE_ENV: self.state_id, "PYTHONUNBUFFERED": "1"})
        header = (f"=== gardenctl: starting {worker.worker_id} (spec {worker.spec_hash}) at "
                  f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} ===\n")
        child = procs.start_group([executable, *worker.argv[1:]], full_env, log_path, header)
        return child, log_path

    def _exit_code(self, record: WorkerRecord) -> object:
        with self._lock:
            child = self._children.get(record.worker_id)
        if child is not None and child.pid == record.pid:
            code = child.poll()
            return ALIVE if code is None else code
        identity = _identity(record)
        if identity is not None and identity.alive():
            return ALIVE
        return record.exit_code  # not our child: the code is unknown unless recorded

    # -- the process side of records (see runtime.records) ---------------------------------

    def _probe_ready(self, record: WorkerRecord) -> bool:
        spec = record.spec
        return self.probe(spec.host, spec.port, spec.served_model_name,
                          api_key_of(record, self.environ), self.probe_timeout)

    def _probe_health(self, record: WorkerRecord) -> str | None:
        spec = record.spec
        return probe_liveness(spec.host, spec.port, spec.liveness.timeout)

    def _log_tail(self, record: WorkerRecord) -> str:
        return read_tail(record.log_path)

    def _milestone(self, record: WorkerRecord) -> str:
        return latest_milestone(read_tail(record.log_path))

    def _exit_time(self, record: WorkerRecord) -> float:
        """The last write to its log: a process that is gone wrote its last line (vLLM logs
        its shutdown) when it ended, however long ago that was observed."""
        now = self.clock()
        try:
            written = os.stat(record.log_path).st_mtime if record.log_path else now
        except OSError:
            written = now
        return max(record.started_at or 0.0, min(written, now))

    def _members(self, record: WorkerRecord, alive: bool) -> tuple[int, ...]:
        if not record.pgid:
            return ()
        leader = _identity(record) if alive else None
        return tuple(procs.group_members(record.pgid, record.worker_id, leader))

    # -- stop ------------------------------------------------------------------------------

    def stop(self, worker_id: str, *, keep: Phase | None = None, reason: str = "",
             cause: Cause = Cause.EXITED, grace: float | None = None) -> base.StopResult:
        """Stop every process of the worker: its recorded group and any marked group with its
        id (an orphan left by an interrupted gardenctl). Only processes proven to be the worker
        (identity or marker) are ever signalled."""
        record = self.state.read_record(worker_id)
        if grace is None:
            grace = (record.spec.shutdown_timeout if record else 30.0) + STOP_MARGIN
        leaders: dict[int, procs.Identity] = {}  # verified alive and ours
        recorded = _identity(record) if record is not None else None
        if record is not None and recorded is not None and self._exit_code(record) is ALIVE:
            leaders[recorded.pid] = recorded
        for marked in procs.marked_group_leaders(self.state_id):
            if marked.worker_id == worker_id:
                leaders.setdefault(marked.pid, marked.identity)
        groups: dict[int, procs.Identity | None] = dict(leaders)
        if record is not None and record.pgid:
            groups.setdefault(record.pgid, recorded)

        def members_now() -> set[int]:
            return {pid for pgid, leader in groups.items()
                    for pid in procs.group_members(pgid, worker_id, leader)}

        members = members_now()
        self._begin_stop(record, bool(leaders))
        outcome = "gone" if not leaders and not members else "stopped"
        for pid in leaders:
            procs.signal_process(pid, signal.SIGTERM)
        if leaders and not self._wait_gone(list(leaders.values()), grace):
            outcome = "killed"
        killed, survivors = procs.kill_survivors(members_now)
        if killed:
            outcome = "killed"
        if survivors:
            raise base.StopError(f"{worker_id}: processes {survivors} survived SIGKILL")
        self._reap(worker_id)
        self._after_stop(worker_id, record, keep, reason, cause)
        detail = {"gone": "already exited", "stopped": "exited after SIGTERM",
                  "killed": "SIGKILLed its process group (it did not exit in time, or left "
                  "processes behind)"}[outcome]
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
        record = WorkerRecord.begin(desired, Launch(), pid=identity.pid,
                                    started_at=identity.create_time or self.clock(),
                                    log_path=str(self.state.log_path(desired.worker_id)))
        _set_identity(record, identity)
        if self._probe_ready(record):
            record.mark_ready(self.clock())
        self._record_new_run(record)

    def log_path(self, worker_id: str) -> str | None:
        record = self.state.read_record(worker_id)
        if record is not None and record.log_path:
            return record.log_path
        path = self.state.log_path(worker_id)
        return str(path) if path.exists() else None

    # -- observe ---------------------------------------------------------------------------

    def observe(self, *, confirm_health: bool = True) -> Observed:
        damaged: list[str] = []
        records = self.state.records(damaged=damaged)
        with ThreadPoolExecutor(max_workers=min(16, max(1, len(records)))) as pool:
            workers = self._observe_records(records, confirm_health, pool.map)
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
        ordered = sorted(by_id.values(), key=lambda w: w.worker_id)
        return Observed(tuple(ordered), source=f"local runtime, state {self.state.root}",
                        notes=tuple(notes))

def _identity(record: WorkerRecord) -> procs.Identity | None:
    if record.pid is None:
        return None
    return procs.Identity(record.pid, record.create_time, record.start_ticks)


def _set_identity(record: WorkerRecord, identity: procs.Identity | None) -> None:
    if identity is not None:
        record.create_time = identity.create_time
        record.start_ticks = identity.start_ticks


def _orphan(marked: procs.MarkedProcess, node: str) -> ObservedWorker | None:
    """A worker found by its marker alone: what its command line and marker tell of it."""
    parts = marked.worker_id.split("/")
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    argv = marked.cmdline
    port = flag_value(argv, "--port")
    utilization = flag_value(argv, "--gpu-memory-utilization")
    served = flag_value(argv, "--served-model-name") or parts[1]
    gpus = tuple(int(g) for g in marked.cuda_visible_devices.split(",") if g.strip().isdigit())
    spec = DesiredWorker(
        worker_id=marked.worker_id, garden=parts[0], model=parts[1],
        model_ref=argv[argv.index("serve") + 1] if "serve" in argv[:-1] else "",
        replica=int(parts[2]), node=node, gpus=gpus, host=flag_value(argv, "--host") or "",
        port=int(port) if port and port.isdigit() else 0, served_model_name=served,
        utilization=_number(utilization), claim_bytes=0, argv=tuple(argv), env=(),
        sizing_hash="", spec_hash=marked.spec_hash, start_timeout=0.0, shutdown_timeout=30.0)
    return ObservedWorker(spec=spec, phase=Phase.UNKNOWN, pid=marked.pid, has_record=False,
                          started_at=marked.identity.create_time, pids=(marked.pid,))


def _number(text: str | None) -> float:
    try:
        return float(text) if text else 0.0
    except ValueError:
        return 0.0
