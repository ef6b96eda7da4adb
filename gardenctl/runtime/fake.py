"""An in-memory runtime for tests: no processes, a clock you control, the stand-in's behaviour.

It reads the same inputs as the stand-in vLLM server (the worker's `vllm serve` argv, parsed by
the stand-in's parser, and its STANDIN_VLLM_* environment) and produces the same log text on
failure (the stand-in's engine), so the contract tests in tests/test_runtime_contract.py hold
for it and for the local runtime running the stand-in alike.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

from gardenctl.observe import CRASHED, READY, STARTING, Observed, ObservedWorker
from gardenctl.runtime import base
from gardenctl.runtime.diagnose import diagnose
from gardenctl.workers import DesiredWorker

_pids = itertools.count(40000)


@dataclass
class FakeWorker:
    worker: DesiredWorker
    pid: int
    started: float  # runtime clock
    ready_delay: float
    started_wall: float = 0.0  # wall time, as a real process's start time
    failure_lines: tuple[str, ...] = ()  # set: it exits after ready_delay with these lines
    exit_code: int = 1
    hang: bool = False
    crash_after: float | None = None  # seconds after ready
    ignore_sigterm: bool = False
    restarts: int = 0
    has_record: bool = True
    log: list[str] = field(default_factory=list)


class FakeRuntime:
    name = "fake"

    def __init__(self, node: str = "node-a", clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.node = node
        self.clock = clock
        self.wall = wall
        self.workers: dict[str, FakeWorker] = {}
        self.exited: dict[str, tuple[FakeWorker, base.WorkerStatus]] = {}
        self.spawned: list[str] = []  # every spawn, in order (tests read it)
        self.stopped: list[str] = []

    # -- the Runtime contract ----------------------------------------------------------------

    def spawn(self, worker: DesiredWorker, env: Mapping[str, str], restarts: int = 0) -> None:
        from gardenctl.testing.standin_env import EnvError, StandinEnv

        if worker.node != self.node:
            raise base.SpawnError("wrong_node", f"{worker.worker_id} is planned on node "
                                  f"{worker.node}, but this runtime runs on {self.node}")
        for other in self.workers.values():
            if other.worker.port == worker.port and self._phase(other)[0] != base.EXITED:
                raise base.SpawnError("port_in_use", f"port {worker.port} on {worker.host} is "
                                      f"already in use by pid {other.pid}")
        try:
            settings = StandinEnv.from_environ(env)
        except EnvError as exc:
            self._record_exit(worker, 2, (str(exc),), restarts)
            return
        lines, code = self._startup_failure(worker, settings)
        fake = FakeWorker(worker=worker, pid=next(_pids), started=self.clock(),
                          started_wall=self.wall(),
                          ready_delay=settings.ready_delay, failure_lines=lines,
                          exit_code=code if code is not None else settings.exit_code,
                          hang=settings.fail == "hang",
                          crash_after=settings.crash_after if settings.fail == "crash_after_ready"
                          else None, ignore_sigterm=settings.ignore_sigterm, restarts=restarts)
        if lines and code == 2:
            fake.ready_delay = 0.0  # a usage error exits at once
        self.exited.pop(worker.worker_id, None)
        self.workers[worker.worker_id] = fake
        self.spawned.append(worker.worker_id)

    def check(self, worker_id: str) -> base.WorkerStatus:
        fake = self.workers.get(worker_id)
        if fake is None:
            gone = self.exited.get(worker_id)
            return gone[1] if gone else base.WorkerStatus(base.EXITED, "no record")
        phase, status = self._phase(fake)
        if phase == base.EXITED:
            del self.workers[worker_id]
            self.exited[worker_id] = (fake, status)
        return status

    def stop(self, worker_id: str, grace: float | None = None) -> base.StopResult:
        fake = self.workers.pop(worker_id, None)
        self.exited.pop(worker_id, None)
        self.stopped.append(worker_id)
        if fake is None:
            return base.StopResult("gone")
        outcome = "killed" if fake.ignore_sigterm else "stopped"
        return base.StopResult(outcome, (fake.pid,), f"{outcome} (fake)")

    def adopt(self, worker: ObservedWorker, desired: DesiredWorker) -> None:
        fake = self.workers.get(worker.worker_id)
        if fake is not None:
            fake.has_record = True

    def log_path(self, worker_id: str) -> str | None:
        return None

    def dead_workers(self) -> set[tuple[str, int | None]]:
        dead = {(w, fake.pid) for w, fake in self.workers.items()
                if self._phase(fake)[0] == base.EXITED}
        return dead | {(w, fake.pid) for w, (fake, _) in self.exited.items()}

    def observe(self) -> Observed:
        workers = []
        for worker_id in sorted(self.workers):
            status = self.check(worker_id)  # moves a worker that exited to self.exited
            if status.phase != base.EXITED:
                phase = READY if status.phase == base.READY else STARTING
                workers.append(self._observed(self.workers[worker_id], phase))
        for worker_id, (fake, status) in sorted(self.exited.items()):
            workers.append(self._observed(fake, CRASHED, status))
        return Observed(tuple(sorted(workers, key=lambda w: w.worker_id)),
                        source="fake runtime")

    # -- test helpers ------------------------------------------------------------------------

    def add_unrecorded(self, worker: DesiredWorker) -> None:
        """A worker running with our marker but no record (gardenctl died after spawning it)."""
        self.workers[worker.worker_id] = FakeWorker(worker=worker, pid=next(_pids),
                                                    started=self.clock() - 3600,
                                                    started_wall=self.wall() - 3600,
                                                    ready_delay=0.0, has_record=False)

    def kill(self, worker_id: str, code: int = -9) -> None:
        """The process dies (kill -9, OOM killer): the next look reports it exited."""
        fake = self.workers.pop(worker_id)
        status = base.WorkerStatus(base.EXITED, "killed by signal 9" if code < 0 else "exited",
                                   exit_code=None if code < 0 else code,
                                   signal=-code if code < 0 else None)
        self.exited[worker_id] = (fake, status)

    # -- internals ---------------------------------------------------------------------------

    def _startup_failure(self, worker: DesiredWorker, settings) -> tuple[tuple[str, ...], int | None]:
        from gardenctl.testing import standin_args
        from gardenctl.testing.standin_engine import STARTUP_FAILURE_MODES, simulate_startup
        from gardenctl.testing.standin_vllm import engine_settings

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

    def _record_exit(self, worker: DesiredWorker, code: int, lines: tuple[str, ...],
                     restarts: int) -> None:
        fake = FakeWorker(worker=worker, pid=next(_pids), started=self.clock(), ready_delay=0,
                          started_wall=self.wall(), failure_lines=lines, exit_code=code,
                          restarts=restarts)
        self.workers[worker.worker_id] = fake
        self.spawned.append(worker.worker_id)

    def _phase(self, fake: FakeWorker) -> tuple[str, base.WorkerStatus]:
        elapsed = self.clock() - fake.started
        if fake.failure_lines and elapsed >= fake.ready_delay:
            tail = "\n".join(fake.failure_lines)
            diagnosis = diagnose(tail)
            return base.EXITED, base.WorkerStatus(base.EXITED, diagnosis.message,
                                                  exit_code=fake.exit_code, log_tail=tail,
                                                  diagnosis=diagnosis)
        if fake.hang or elapsed < fake.ready_delay:
            return base.STARTING, base.WorkerStatus(base.STARTING, "loading weights")
        if fake.crash_after is not None and elapsed >= fake.ready_delay + fake.crash_after:
            from gardenctl.testing.standin_engine import engine_crashed

            crash = engine_crashed()
            tail = "\n".join(crash.engine_traceback + crash.server_traceback)
            diagnosis = diagnose(tail)
            return base.EXITED, base.WorkerStatus(base.EXITED, diagnosis.message,
                                                  exit_code=fake.exit_code, log_tail=tail,
                                                  diagnosis=diagnosis)
        return base.READY, base.WorkerStatus(base.READY, "ready")

    def _observed(self, fake: FakeWorker, phase: str,
                  status: base.WorkerStatus | None = None) -> ObservedWorker:
        w = fake.worker
        return ObservedWorker(
            worker_id=w.worker_id, garden=w.garden, model=w.model, replica=w.replica, node=w.node,
            gpus=w.gpus, port=w.port, utilization=w.utilization, claim_bytes=w.claim_bytes,
            spec_hash=w.spec_hash, sizing_hash=w.sizing_hash, argv=w.argv, phase=phase,
            pid=fake.pid, has_record=fake.has_record, restarts=fake.restarts,
            started_at=fake.started_wall,
            exit_code=status.exit_code if status else None,
            last_error=status.detail if status else None, pids=(fake.pid,), env=w.env,
        )
