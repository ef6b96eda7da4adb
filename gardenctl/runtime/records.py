"""What every runtime does with records, whatever runs its processes.

`RecordedRuntime` keeps each worker's record through its phases (`gardenctl.phases`): it
turns what a runtime sees of a process (alive or its exit code, ready, healthy, its log) into
the record's phase, diagnosis and history, and observes records as `ObservedWorker`s. A
runtime supplies only the process side (`_exit_code`, `_probe_ready`, `_probe_health`,
`_log_tail`, `_members`); the local runtime runs real processes, the fake simulates them, and
both keep records the same way, so the contract tests hold for both.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Protocol

from gardenctl.observe import ObservedWorker
from gardenctl.plan.model import Launch
from gardenctl.runtime import base
from gardenctl.runtime.diagnose import NO_ERROR_MESSAGE, diagnose
from gardenctl.runtime.sleepmode import SleepModeError
from gardenctl.spec.models import env_reference
from gardenctl.state import WorkerRecord
from gardenctl.vocab import Cause, Phase
from gardenctl.workers import DesiredWorker

ALIVE = object()  # what _exit_code returns for a process that still runs
CONFIRM_INTERVAL = 0.5  # seconds between the re-probes of a failing worker in one observation
RUN_LOG_BYTES = 4 * 1024 * 1024  # how much of a run's log diagnose reads (its last 4 MiB)
STARTUP_LOG_BYTES = 8 * 1024 * 1024  # the head of a run's log where vLLM writes its start-up
STATUS_TAIL_LINES = 25  # the log tail a status shows


def read_run_log(path: str | None, limit: int = RUN_LOG_BYTES) -> str:
    """A run's log file, its last ``limit`` bytes (from a line start), or "" if unreadable."""
    if not path:
        return ""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - limit))
            data = handle.read(limit)  # the file may still grow (a child still writing)
    except OSError:
        return ""
    if size > limit:  # started mid-line: drop the partial first line
        data = data[data.find(b"\n") + 1:]
    return data.decode("utf-8", "replace")


def read_log_head(path: str | os.PathLike[str], limit: int = STARTUP_LOG_BYTES) -> str:
    """The first ``limit`` bytes of a run's log (to a line end), or "" if unreadable."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError:
        return ""
    if len(data) > limit:
        data = data[:limit]
        data = data[:data.rfind(b"\n") + 1]
    return data.decode("utf-8", "replace")


def api_key_of(record: WorkerRecord, environ: Mapping[str, str]) -> str | None:
    """The worker's VLLM_API_KEY (its `env`, a ${NAME} reference resolved in ``environ``), which
    its /v1/models needs."""
    value = dict(record.spec.env).get("VLLM_API_KEY")
    if value is None:
        return None
    ref = env_reference(value)
    return environ.get(ref) if ref else value


class RecordStore(Protocol):
    def read_record(self, worker_id: str) -> WorkerRecord | None: ...

    def write_record(self, record: WorkerRecord) -> None: ...

    def delete_record(self, worker_id: str) -> None: ...

    def records(self, garden: str | None = None,
                damaged: list[str] | None = None) -> list[WorkerRecord]: ...


class MemoryStore:
    """Records in memory (the fake runtime's state directory)."""

    def __init__(self) -> None:
        self._records: dict[str, dict[str, object]] = {}

    def read_record(self, worker_id: str) -> WorkerRecord | None:
        data = self._records.get(worker_id)
        return WorkerRecord.from_json(dict(data)) if data is not None else None

    def write_record(self, record: WorkerRecord) -> None:
        self._records[record.worker_id] = record.to_json()  # a copy, as a file would be

    def delete_record(self, worker_id: str) -> None:
        self._records.pop(worker_id, None)

    def records(self, garden: str | None = None,
                damaged: list[str] | None = None) -> list[WorkerRecord]:
        found = [WorkerRecord.from_json(dict(data)) for _, data in sorted(self._records.items())]
        return [r for r in found if garden is None or r.garden == garden]


class RecordedRuntime:
    """The record side of a runtime (see the module docstring).

    Records change by compare-and-swap: an update is written only if the stored record is
    still the same run in the phase it was read in, so an observation that read a dead run
    never overwrites the record of the run a concurrent restart has just begun."""

    def __init__(self, store: RecordStore, *, writable: bool, clock: Callable[[], float],
                 gardens: Container[str] | None = None) -> None:
        self.store = store
        self.writable = writable
        # the gardens whose records it may update and whose deaths it watches: those whose
        # lock its owner holds (a live view, as the owner locks them); None: every garden
        self.gardens = gardens
        self.clock = clock
        self._records_lock = threading.RLock()
        self._settling: set[str] = set()  # standby workers being put to sleep as they start

    # -- the process side, supplied by each runtime -----------------------------------------

    def _exit_code(self, record: WorkerRecord) -> object:
        """ALIVE, or the run's exit code (negative: killed by that signal; None: unknown)."""
        raise NotImplementedError

    def _probe_ready(self, record: WorkerRecord) -> bool:
        """/health answers 200 and /v1/models lists the served name."""
        raise NotImplementedError

    def _probe_health(self, record: WorkerRecord) -> str | None:
        """One liveness probe: None when healthy, else why not."""
        raise NotImplementedError

    def _log_tail(self, record: WorkerRecord) -> str:
        raise NotImplementedError

    def _run_log(self, record: WorkerRecord) -> str:
        """The log of the record's run (one file per run), bounded to its last RUN_LOG_BYTES:
        what `diagnose` reads, since vLLM prints the root cause well above its last lines.
        Without a readable log file, the runtime's own tail."""
        text = read_run_log(record.log_path)
        return text if text else self._log_tail(record)

    def _milestone(self, record: WorkerRecord) -> str:
        """What a loading worker is doing now."""
        raise NotImplementedError

    def _members(self, record: WorkerRecord, alive: bool) -> tuple[int, ...]:
        """The live processes of the worker (its process group)."""
        raise NotImplementedError

    def _unknown_exit(self, record: WorkerRecord) -> str:
        """Why a run ended whose exit status nobody can tell."""
        return ("its process is gone (exit status unknown: it was not started by this "
                "gardenctl process)")

    def _exit_time(self, record: WorkerRecord) -> float:
        """When a run found gone ended, as well as the runtime can tell (the same answer to
        every observer, so that a plan made read-only matches the apply that follows it)."""
        return self.clock()

    # -- shared ----------------------------------------------------------------------------

    def _save(self, record: WorkerRecord) -> bool:
        """Write an update of ``record`` if it is still the run and phase it was read as."""
        if not self.writable or not self._owns(record):
            return False
        with self._records_lock:
            stored = self.store.read_record(record.worker_id)
            if (stored is None or stored.pid != record.pid
                    or stored.started_at != record.started_at
                    or stored.phase != record.loaded_as):
                return False
            self.store.write_record(record)
            record.loaded_as = record.phase
            return True

    def _owns(self, record: WorkerRecord) -> bool:
        return self.gardens is None or record.garden in self.gardens

    def _record_new_run(self, record: WorkerRecord) -> None:
        with self._records_lock:
            self.store.write_record(record)
            record.loaded_as = record.phase

    def fail(self, worker: DesiredWorker, launch: Launch, reason: str, cause: Cause,
             hint: str = "") -> None:
        with self._records_lock:
            before = self.store.read_record(worker.worker_id)
            self._record_new_run(WorkerRecord.failed_start(
                worker, launch, reason=reason, cause=cause, hint=hint, at=self.clock(),
                before=before))

    def check(self, worker_id: str) -> base.WorkerStatus:
        record = self.store.read_record(worker_id)
        if record is None:
            return base.WorkerStatus(Phase.FAILED, "no record")
        if record.phase.dead:
            return self._ended_status(record)
        code = self._exit_code(record)
        if code is not ALIVE:
            return self._record_exit(record, code)
        if record.phase == Phase.STARTING:
            settled = self._mark_if_ready(record)
            if settled is not None:
                return base.WorkerStatus(Phase.READY, settled)
            return base.WorkerStatus(Phase.STARTING, self._milestone(record))
        return base.WorkerStatus(record.phase, record.last_error or "")

    def _mark_if_ready(self, record: WorkerRecord) -> str | None:
        """Record a loading worker READY once it answers; what it is now (None: not ready).

        A standby (sleep) worker is first put to sleep (`_settle`), by the runtime that owns
        its record only: so READY always means asleep-until-woken to every observer (the
        gateway never sends a request to one still settling, where it would wait)."""
        if not self._probe_ready(record):
            return None
        standby = record.spec.standby
        if standby is None or not standby.sleeps:
            record.mark_ready(self.clock())
            self._save(record)
            return self._settle(record)
        if not (self.writable and self._owns(record)) or not self._begin_settling(record):
            return None
        try:
            settled = self._settle(record)
            record.mark_ready(self.clock())
            self._save(record)
        finally:
            with self._records_lock:
                self._settling.discard(record.worker_id)
        return settled

    def _begin_settling(self, record: WorkerRecord) -> bool:
        """Only one caller (watch's loop and an executor may both check a loading worker) puts
        a new run to sleep, and only while it is still recorded loading: a second, late one
        would put back to sleep a worker the gateway has just woken."""
        with self._records_lock:
            stored = self.store.read_record(record.worker_id)
            if (record.worker_id in self._settling or stored is None
                    or stored.pid != record.pid or stored.phase != Phase.STARTING):
                return False
            self._settling.add(record.worker_id)
            return True

    def _settle(self, record: WorkerRecord) -> str:
        """A standby worker starts awake (vLLM has no way to start asleep): as it becomes ready,
        it is put to sleep, so that its GPU's wake slot is free for the gateway. Done where the
        transition to READY is recorded (by its owner), so apply, watch and every later pass
        agree."""
        standby = record.spec.standby
        if standby is None:
            return "ready"
        if not standby.sleeps:
            return "ready, and stopped again when idle (standby: stop)"
        try:
            self._sleep_mode(record, "sleep")
        except SleepModeError as exc:
            return f"ready, but still awake: putting it to sleep failed ({exc})"
        return f"ready, and asleep until a request comes (standby, level {standby.level})"

    def _record_exit(self, record: WorkerRecord, code: object) -> base.WorkerStatus:
        """The run ended without being asked to: record how, diagnosed from its log."""
        tail = "\n".join(self._log_tail(record).splitlines()[-STATUS_TAIL_LINES:])
        diagnosis = diagnose(self._run_log(record))
        exit_code = code if isinstance(code, int) else None
        signal_number = -exit_code if exit_code is not None and exit_code < 0 else None
        if signal_number:
            error, cause = f"killed by signal {signal_number}", Cause.KILLED_BY_SIGNAL
        elif diagnosis.cause != Cause.UNKNOWN:
            error, cause = diagnosis.message, diagnosis.cause
        elif exit_code is None:
            error, cause = self._unknown_exit(record), Cause.EXITED
        elif diagnosis.message != NO_ERROR_MESSAGE:  # the last error line the log has
            error, cause = f"exited with code {exit_code}: {diagnosis.message}", Cause.EXITED
        else:
            error, cause = f"exited with code {exit_code}", Cause.EXITED
        if record.phase == Phase.STOPPING:  # a stop that was interrupted: it is over anyway
            error = f"{error} (while being stopped)"
        record.mark_ended(self._exit_time(record), exit_code=exit_code, error=error, cause=cause,
                          hint=diagnosis.hint, facts=diagnosis.facts())
        self._save(record)
        return base.WorkerStatus(record.phase, error, exit_code=None if signal_number
                                 else exit_code, signal=signal_number, log_tail=tail,
                                 diagnosis=diagnosis)

    def _ended_status(self, record: WorkerRecord) -> base.WorkerStatus:
        code = record.exit_code
        tail = "\n".join(self._log_tail(record).splitlines()[-STATUS_TAIL_LINES:])
        return base.WorkerStatus(record.phase, record.last_error or "",
                                 exit_code=code if code is None or code >= 0 else None,
                                 signal=-code if code is not None and code < 0 else None,
                                 log_tail=tail,
                                 diagnosis=diagnose(self._run_log(record)) if tail else None)

    def log_path(self, worker_id: str) -> str | None:
        record = self.store.read_record(worker_id)
        return record.log_path if record is not None and record.log_path else None

    def read_log(self, worker_id: str, *, previous: bool = False,
                 limit: int = RUN_LOG_BYTES) -> str | None:
        """The worker's log (its last ``limit`` bytes; ``previous``: the run before), or None
        when it has none."""
        path = self.log_path(worker_id)
        if path:
            if previous:
                path = path + ".1"
            return read_run_log(path, limit) if os.path.exists(path) else None
        record = self.store.read_record(worker_id)
        return self._log_tail(record) if record is not None and not previous else None

    def startup_log(self, worker_id: str) -> str | None:
        """The head of the current run's log, where vLLM writes its start-up figures."""
        path = self.log_path(worker_id)
        if path:
            return read_log_head(path) if os.path.exists(path) else None
        return self.read_log(worker_id)

    def probe_health(self, worker_id: str) -> str | None:
        record = self.store.read_record(worker_id)
        if record is None:
            return "no record"
        return self._probe_health(record)

    # -- sleep mode (standby workers) ---------------------------------------------------------

    def put_to_sleep(self, worker_id: str) -> None:
        """Put a standby worker to sleep at its level, once its requests in flight are done.
        SleepModeError when it cannot."""
        self._sleep_mode(self._standby_record(worker_id), "sleep")

    def wake_up(self, worker_id: str) -> None:
        """Wake a sleeping standby worker (and reload its weights after a level-2 sleep)."""
        self._sleep_mode(self._standby_record(worker_id), "wake")

    def is_sleeping(self, worker_id: str) -> bool | None:
        """Whether a standby worker sleeps now; None when it does not say."""
        record = self.store.read_record(worker_id)
        if (record is None or record.spec.standby is None or not record.spec.standby.sleeps
                or record.phase.dead):
            return None
        try:
            return self._sleep_mode(record, "is_sleeping")
        except SleepModeError:
            return None

    def _standby_record(self, worker_id: str) -> WorkerRecord:
        record = self.store.read_record(worker_id)
        if record is None or record.phase.dead:
            raise SleepModeError(f"{worker_id} is not running")
        if record.spec.standby is None or not record.spec.standby.sleeps:
            raise SleepModeError(f"{worker_id} has no sleep mode (it is not a standby: sleep "
                                 "worker)")
        return record

    def _sleep_mode(self, record: WorkerRecord, action: str) -> bool | None:
        """One sleep-mode action on the worker (runtime.sleepmode.act), wherever it runs."""
        raise NotImplementedError

    def mark_unhealthy(self, worker_id: str, detail: str) -> None:
        record = self.store.read_record(worker_id)
        if record is not None and record.phase == Phase.READY:
            record.mark_unhealthy(detail)
            self._save(record)

    def _confirm_unhealthy(self, record: WorkerRecord) -> str:
        """'' when the ready worker is healthy; else why not, once every one of its
        failure_threshold probes (CONFIRM_INTERVAL apart) failed."""
        threshold = record.spec.liveness.failure_threshold
        detail = ""
        for attempt in range(threshold):
            if attempt:
                time.sleep(CONFIRM_INTERVAL)
            problem = self._probe_health(record)
            if problem is None:
                return ""
            detail = problem
        return f"{detail} ({threshold} probes in a row)"

    def dead_workers(self) -> set[tuple[str, int | None]]:
        return {(r.worker_id, r.pid) for r in self.store.records(damaged=[])
                if self._owns(r) and r.phase in (Phase.STARTING, Phase.READY, Phase.UNHEALTHY)
                and self._exit_code(r) is not ALIVE}

    def gpus_busy(self, worker_id: str, node: str, gpus: Iterable[int]) -> str | None:
        """vLLM's rule, across every garden of the state directory: nothing starts or stops
        on a GPU while another worker loads or stops there. Why not now, or None."""
        mine = set(gpus)
        for record in self.store.records(damaged=[]):
            spec = record.spec
            if (record.worker_id == worker_id or spec.node != node
                    or not mine & set(spec.gpus)
                    or record.phase not in (Phase.STARTING, Phase.STOPPING)):
                continue
            if self._exit_code(record) is ALIVE:
                doing = "loading" if record.phase == Phase.STARTING else "stopping"
                shared = ",".join(str(g) for g in sorted(mine & set(spec.gpus)))
                return f"GPU {shared} is busy: {record.worker_id} is {doing} there"
        return None

    def _check_gpus_free(self, worker: DesiredWorker) -> None:
        busy = self.gpus_busy(worker.worker_id, worker.node, worker.gpus)
        if busy is not None:
            raise base.GpuBusy(busy)

    def _begin_stop(self, record: WorkerRecord | None, alive: bool) -> None:
        if record is not None and alive and record.phase.running \
                and record.phase != Phase.STOPPING:
            record.move_to(Phase.STOPPING)
            self._save(record)

    def _after_stop(self, worker_id: str, record: WorkerRecord | None, keep: Phase | None,
                    reason: str, cause: Cause) -> None:
        """Remove the record, or keep it as an ended run (to be started again)."""
        if keep is None or record is None:
            with self._records_lock:
                self.store.delete_record(worker_id)
            return
        if record.phase.running:
            record.mark_ended(self.clock(), exit_code=None, error=reason or "stopped",
                              cause=cause)
            self._save(record)

    def _observe_records(self, records: Iterable[WorkerRecord], confirm_health: bool,
                         mapper: Callable[..., Iterable[ObservedWorker]] = map,
                         ) -> list[ObservedWorker]:
        return list(mapper(lambda r: self._observe_record(r, confirm_health), records))

    def _observe_record(self, record: WorkerRecord, confirm_health: bool) -> ObservedWorker:
        if record.phase.dead:  # EngineCore or TP workers can outlive a killed main process
            return record.observed(record.phase, self._members(record, False))
        code = self._exit_code(record)
        if code is not ALIVE:
            self._record_exit(record, code)
            return record.observed(record.phase, self._members(record, False))
        health = ""
        if record.phase == Phase.STARTING:
            self._mark_if_ready(record)
        elif record.phase == Phase.READY and confirm_health:
            health = self._confirm_unhealthy(record)
            if health:
                record.mark_unhealthy(health)
                self._save(record)
        return record.observed(record.phase, self._members(record, True), health=health)


__all__ = ["ALIVE", "MemoryStore", "RecordStore", "RecordedRuntime", "api_key_of",
           "read_log_head", "read_run_log"]
