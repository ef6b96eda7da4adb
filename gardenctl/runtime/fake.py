"""An in-memory runtime for tests: simulated processes, a clock you control, real bookkeeping.

Only the processes are simulated; records are kept by the same code as the local runtime's
(`runtime.records`), in memory. A simulated process behaves like the stand-in vLLM server run
by the local runtime: it reads the worker's `vllm serve` argv with the stand-in's parser and its
STANDIN_VLLM_* environment, and fails with the stand-in engine's log lines, so the contract
tests in tests/test_runtime_contract.py hold for both runtimes.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gardenctl.observe import Observed, ObservedWorker
from gardenctl.plan.model import Launch
from gardenctl.runtime import base
from gardenctl.runtime.records import ALIVE, MemoryStore, RecordedRuntime
from gardenctl.runtime.sleepmode import SleepModeError
from gardenctl.state import WorkerRecord
from gardenctl.vocab import Cause, Phase
from gardenctl.workers import DesiredWorker

_pids = itertools.count(40000)


@dataclass
class FakeProcess:
    """A simulated `vllm serve`: when it answers, fails or dies, on the runtime's clock."""

    worker: DesiredWorker
    pid: int
    started: float
    ready_delay: float
    failure_lines: tuple[str, ...] = ()  # set: it exits after ready_delay with these lines
    exit_code: int = 1
    hang: bool = False
    crash_after: float | None = None  # seconds after ready: the engine dies
    keep_alive_on_engine_death: bool = False  # then the API server stays up, /health 503
    ignore_sigterm: bool = False
    killed: int | None = None  # set by kill(): the exit code (negative: a signal)
    asleep: bool = False  # sleep mode (standby workers)

    def exit_code_at(self, now: float) -> object:
        if self.killed is not None:
            return self.killed
        elapsed = now - self.started
        if self.failure_lines and elapsed >= self.ready_delay:
            return self.exit_code
        if self._engine_dead(now) and not self.keep_alive_on_engine_death:
            return self.exit_code
        return ALIVE

    def _engine_dead(self, now: float) -> bool:
        return (self.crash_after is not None
                and now - self.started >= self.ready_delay + self.crash_after)

    def answers(self, now: float) -> bool:
        """/health is 200 (and /v1/models lists the worker)."""
        return (self.exit_code_at(now) is ALIVE and not self.hang and not self.failure_lines
                and now - self.started >= self.ready_delay and not self._engine_dead(now))

    def log(self, now: float) -> str:
        if self.failure_lines and self.exit_code_at(now) is not ALIVE:
            return "\n".join(self.failure_lines)
        if self._engine_dead(now):
            from gardenctl.testing.standin_engine import engine_crashed

            crash = engine_crashed()
            return "\n".join(crash.engine_traceback + crash.server_traceback)
        return ""


class FakeRuntime(RecordedRuntime):
    name = "fake"

    def __init__(self, node: str = "node-a", clock: Callable[[], float] = time.time) -> None:
        super().__init__(MemoryStore(), writable=True, clock=clock)
        self.node = node
        self.processes: dict[str, FakeProcess] = {}  # by worker id: its current process
        self.spawned: list[str] = []  # every spawn, in order (tests read it)
        self.stopped: list[str] = []

    # -- the Runtime contract ----------------------------------------------------------------

    def spawn(self, worker: DesiredWorker, env: Mapping[str, str], launch: Launch) -> None:
        from gardenctl.testing.standin_env import EnvError, StandinEnv

        if worker.node != self.node:
            raise base.SpawnError(Cause.SPAWN_FAILED, f"{worker.worker_id} is planned on node "
                                  f"{worker.node}, but this runtime runs on {self.node}")
        self._check_gpus_free(worker)
        for other_id, other in self.processes.items():
            if other.worker.port == worker.port and other_id != worker.worker_id \
                    and other.exit_code_at(self.clock()) is ALIVE:
                error = base.SpawnError(Cause.PORT_IN_USE, f"port {worker.port} on "
                                        f"{worker.host} is already in use by pid {other.pid}")
                self.fail(worker, launch, str(error), error.cause)
                raise error
        now = self.clock()
        try:
            settings = StandinEnv.from_environ(env)
        except EnvError as exc:
            process = FakeProcess(worker, next(_pids), now, 0.0, failure_lines=(str(exc),),
                                  exit_code=2)
        else:
            lines, code = self._startup_failure(worker, settings)
            process = FakeProcess(
                worker, next(_pids), now, settings.ready_delay, failure_lines=lines,
                exit_code=code if code is not None else settings.exit_code,
                hang=settings.fail == "hang",
                crash_after=settings.crash_after if settings.fail == "crash_after_ready"
                else None, keep_alive_on_engine_death=settings.keep_alive_on_engine_death,
                ignore_sigterm=settings.ignore_sigterm)
            if lines and code == 2:
                process.ready_delay = 0.0  # a usage error exits at once
        self.processes[worker.worker_id] = process
        self.spawned.append(worker.worker_id)
        self._record_new_run(WorkerRecord.begin(
            worker, launch, pid=process.pid, started_at=now, log_path="",
            before=self.store.read_record(worker.worker_id)))

    def stop(self, worker_id: str, *, keep: Phase | None = None, reason: str = "",
             cause: Cause = Cause.EXITED, grace: float | None = None) -> base.StopResult:
        record = self.store.read_record(worker_id)
        process = self.processes.pop(worker_id, None)
        self.stopped.append(worker_id)
        alive = process is not None and process.exit_code_at(self.clock()) is ALIVE
        self._begin_stop(record, alive)
        self._after_stop(worker_id, record, keep, reason, cause)
        if process is None or not alive:
            return base.StopResult("gone", (process.pid,) if process else (), "already exited")
        outcome = "killed" if process.ignore_sigterm else "stopped"
        return base.StopResult(outcome, (process.pid,), f"{outcome} (fake)")

    def adopt(self, worker: ObservedWorker, desired: DesiredWorker) -> None:
        process = self.processes.get(worker.worker_id)
        if process is None:
            return
        record = WorkerRecord.begin(desired, Launch(), pid=process.pid,
                                    started_at=worker.started_at or self.clock(), log_path="")
        if process.answers(self.clock()):
            record.mark_ready(self.clock())
        self._record_new_run(record)

    def log_path(self, worker_id: str) -> str | None:
        return None

    def observe(self, *, confirm_health: bool = True) -> Observed:
        records = self.store.records()
        workers = {w.worker_id: w for w in self._observe_records(records, confirm_health)}
        for worker_id, process in sorted(self.processes.items()):
            record = self.store.read_record(worker_id)
            if (record is None or record.pid != process.pid) \
                    and process.exit_code_at(self.clock()) is ALIVE:
                workers[worker_id] = ObservedWorker(  # marked, unrecorded: an orphan
                    spec=process.worker, phase=Phase.UNKNOWN, pid=process.pid,
                    has_record=False, started_at=process.started, pids=(process.pid,))
        return Observed(tuple(workers[w] for w in sorted(workers)), source="fake runtime")

    # -- the process side of records ---------------------------------------------------------

    def _process(self, record: WorkerRecord) -> FakeProcess | None:
        process = self.processes.get(record.worker_id)
        return process if process is not None and process.pid == record.pid else None

    def _exit_code(self, record: WorkerRecord) -> object:
        process = self._process(record)
        return process.exit_code_at(self.clock()) if process else record.exit_code

    def _probe_ready(self, record: WorkerRecord) -> bool:
        process = self._process(record)
        return process is not None and process.answers(self.clock())

    def _probe_health(self, record: WorkerRecord) -> str | None:
        process = self._process(record)
        if process is None or process.exit_code_at(self.clock()) is not ALIVE:
            return "/health did not answer (connection refused)"
        return None if process.answers(self.clock()) else "/health answered 503"

    def _log_tail(self, record: WorkerRecord) -> str:
        process = self._process(record)
        return process.log(self.clock()) if process else ""

    def _milestone(self, record: WorkerRecord) -> str:
        return "loading weights"

    def _sleep_mode(self, record: WorkerRecord, action: str) -> bool | None:
        process = self._process(record)
        if process is None or not process.answers(self.clock()):
            raise SleepModeError(f"{record.worker_id} does not answer")
        if action == "is_sleeping":
            return process.asleep
        process.asleep = action == "sleep"
        return None

    def _members(self, record: WorkerRecord, alive: bool) -> tuple[int, ...]:
        process = self._process(record)
        return (process.pid,) if process and process.exit_code_at(self.clock()) is ALIVE else ()

    # -- test helpers ------------------------------------------------------------------------

    def add_unrecorded(self, worker: DesiredWorker) -> None:
        """A worker running with our marker but no record (gardenctl died after spawning it)."""
        self.processes[worker.worker_id] = FakeProcess(worker, next(_pids),
                                                       self.clock() - 3600, 0.0)

    def kill(self, worker_id: str, code: int = -9) -> None:
        """The process dies (kill -9, the OOM killer): the next look reports it exited."""
        self.processes[worker_id].killed = code

    def _startup_failure(self, worker: DesiredWorker,
                         settings: object) -> tuple[tuple[str, ...], int | None]:
        from gardenctl.testing import standin_args
        from gardenctl.testing.standin_engine import STARTUP_FAILURE_MODES, simulate_startup
        from gardenctl.testing.standin_env import StandinEnv
        from gardenctl.testing.standin_vllm import engine_settings

        assert isinstance(settings, StandinEnv)
        argv = list(worker.argv)
        rest = argv[argv.index("serve") + 1:] if "serve" in argv else argv[1:]
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                args = standin_args.parse_serve_args(rest)
        except SystemExit as exc:
            return tuple(stderr.getvalue().splitlines()) or ("usage error",), int(exc.code or 2)
        mode = settings.fail if settings.fail in STARTUP_FAILURE_MODES else None
        result = simulate_startup(engine_settings(args, settings), mode)
        if result.failure is None:
            return (), None
        return result.failure.engine_traceback + result.failure.server_traceback, None
