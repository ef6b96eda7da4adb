"""The Ray runtime: the same workers, records and guarantees as the local runtime, on every node
of a Ray cluster, with no state outside the cluster.

The record side is `RecordedRuntime`'s, with the records in Ray's key-value store; the process
side is a supervisor actor per worker on its node (`supervisor.WorkerSupervisor`), reached
through `cluster.RayCluster`. A gardenctl anywhere, with an empty state directory, sees every
worker, its spec hash, pid and phase, and can reconcile; a worker whose actor or node is gone
is observed ended, and the planner starts it again where the plan now puts it.

GPUs: the plan chooses them. The worker's process gets them in CUDA_VISIBLE_DEVICES (Ray's own
setting is off for its actor); Ray's accounting holds every GPU a worker uses through a lease
aligned with that GPU (`RayCluster.lease_gpus`), so other Ray work never lands on it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Container, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

from gardenctl.errors import GardenError
from gardenctl.observe import Observed, ObservedWorker
from gardenctl.plan.model import Launch
from gardenctl.runtime import base
from gardenctl.runtime import processes as procs
from gardenctl.runtime.local import _orphan
from gardenctl.runtime.ray.cluster import ActorGone, RayCluster
from gardenctl.runtime.records import (
    ALIVE,
    RUN_LOG_BYTES,
    RecordedRuntime,
    api_key_of,
)
from gardenctl.runtime.sleepmode import SleepModeError
from gardenctl.state import WorkerRecord
from gardenctl.vocab import Cause, Phase
from gardenctl.workers import SPEC_HASH_ENV, STATE_ENV, WORKER_ID_ENV, DesiredWorker

LOG_TAIL_BYTES = 16 * 1024
STOP_MARGIN = 10.0  # seconds beyond the worker's shutdown_timeout before SIGKILL
START_TIMEOUT = 120.0  # seconds for a new actor to be placed and start its process
RECORD_PREFIX = "record/"
RUNNING = (Phase.STARTING, Phase.READY, Phase.UNHEALTHY, Phase.STOPPING)


class KvRecordStore:
    """Worker records in the cluster's key-value store (one JSON document per worker)."""

    def __init__(self, cluster: RayCluster) -> None:
        self.cluster = cluster

    def read_record(self, worker_id: str) -> WorkerRecord | None:
        data = self.cluster.kv_get(RECORD_PREFIX + worker_id)
        return _decode(data) if data is not None else None

    def write_record(self, record: WorkerRecord) -> None:
        self.cluster.kv_put(RECORD_PREFIX + record.worker_id,
                            json.dumps(record.to_json(), sort_keys=True).encode())

    def delete_record(self, worker_id: str) -> None:
        self.cluster.kv_delete(RECORD_PREFIX + worker_id)

    def records(self, garden: str | None = None,
                damaged: list[str] | None = None) -> list[WorkerRecord]:
        prefix = RECORD_PREFIX + (f"{garden}/" if garden else "")
        found = []
        for key in self.cluster.kv_keys(prefix):
            data = self.cluster.kv_get(key)
            record = _decode(data) if data is not None else None
            if record is None:
                if data is not None and damaged is not None:
                    damaged.append(f"the record {key} in the Ray cluster is damaged")
                continue
            found.append(record)
        return found


def _decode(data: bytes) -> WorkerRecord | None:
    try:
        return WorkerRecord.from_json(json.loads(data))
    except (ValueError, TypeError, KeyError):
        return None


class RayRuntime(RecordedRuntime):
    name = "ray"

    def __init__(self, cluster: RayCluster, *, writable: bool = True,
                 environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.time,
                 gardens: Container[str] | None = None) -> None:
        super().__init__(KvRecordStore(cluster), writable=writable, clock=clock, gardens=gardens)
        self.cluster = cluster
        self.node = f"ray:{cluster.address}"  # every node of the cluster
        self.address = cluster.address
        self.environ = environ if environ is not None else os.environ
        self._ended_at: dict[tuple[str, int | None], float] = {}

    # -- the process side of records (see runtime.records) ---------------------------------

    def _call(self, worker_id: str, method: str, *args: Any, **kw: Any) -> Any:
        """Call a method of the worker's actor; ActorGone when it has none, or it is dead."""
        actor = self.cluster.worker(worker_id)
        if actor is None:
            raise ActorGone("it has no actor")
        return self.cluster.call(actor, method, *args, **kw)

    def _exit_code(self, record: WorkerRecord) -> object:
        try:
            state, code, when = self._call(record.worker_id, "exit_code", record.pid)
        except ActorGone:
            return None
        if state == "alive":
            return ALIVE
        if state == "exited":
            self._ended_at[(record.worker_id, record.pid)] = when or self.clock()
            return code
        return None

    def _unknown_exit(self, record: WorkerRecord) -> str:
        node = record.spec.node
        if node not in self.cluster.nodes():
            return f"its node {node} left the Ray cluster (its actor and process went with it)"
        return (f"its actor on node {node} is gone (killed, or it failed), and its process with "
                "it")

    def _exit_time(self, record: WorkerRecord) -> float:
        return self._ended_at.pop((record.worker_id, record.pid), None) or self.clock()

    def _probe_ready(self, record: WorkerRecord) -> bool:
        spec = record.spec
        try:
            return bool(self._call(record.worker_id, "probe_ready", spec.host, spec.port,
                                   spec.served_model_name, api_key_of(record, self.environ),
                                   1.0))
        except ActorGone:
            return False

    def _sleep_mode(self, record: WorkerRecord, action: str) -> bool | None:
        """From the worker's node (its address may be loopback there)."""
        spec = record.spec
        level = spec.standby.level if spec.standby else 1
        try:
            answer = self._call(record.worker_id, "sleep_mode", action, spec.host, spec.port,
                                level, api_key_of(record, self.environ))
        except ActorGone as exc:
            raise SleepModeError(str(exc)) from None
        if isinstance(answer, dict):
            raise SleepModeError(str(answer.get("error", answer)))
        return answer if isinstance(answer, bool) else None

    def _probe_health(self, record: WorkerRecord) -> str | None:
        spec = record.spec
        try:
            answer: str | None = self._call(record.worker_id, "probe_health", spec.host,
                                            spec.port, spec.liveness.timeout)
        except ActorGone as exc:
            return str(exc)
        return answer

    def _log_tail(self, record: WorkerRecord) -> str:
        return self.read_log(record.worker_id, limit=LOG_TAIL_BYTES) or ""

    def _run_log(self, record: WorkerRecord) -> str:
        return self.read_log(record.worker_id) or ""

    def _milestone(self, record: WorkerRecord) -> str:
        try:
            return str(self._call(record.worker_id, "milestone"))
        except ActorGone:
            return ""

    def _members(self, record: WorkerRecord, alive: bool) -> tuple[int, ...]:
        if not alive:
            return ()
        try:
            return tuple(self._call(record.worker_id, "members"))
        except ActorGone:
            return ()

    # -- spawn -----------------------------------------------------------------------------

    def spawn(self, worker: DesiredWorker, env: Mapping[str, str], launch: Launch) -> None:
        node = self.cluster.nodes().get(worker.node)
        if node is None:
            self._refuse(worker, launch, Cause.SPAWN_FAILED,
                         f"{worker.worker_id} is planned on node {worker.node}, which is not in "
                         f"the Ray cluster at {self.cluster.address}")
        with self.cluster.gpu_mutex(worker.garden):
            self._check_gpus_free(worker)
            try:
                self.cluster.lease_gpus(node, worker.gpus)
            except GardenError as exc:
                self._refuse(worker, launch, Cause.SPAWN_FAILED, str(exc))
            markers = {WORKER_ID_ENV: worker.worker_id, SPEC_HASH_ENV: worker.spec_hash,
                       STATE_ENV: self.node, "PYTHONUNBUFFERED": "1"}
            actor = self.cluster.start_worker_actor(worker.worker_id, worker.spec_hash, node)
            try:
                answer = self.cluster.call(actor, "start", list(worker.argv), dict(env),
                                           markers, worker.host, worker.port,
                                           timeout=START_TIMEOUT)
            except ActorGone as exc:
                self.cluster.kill(actor)
                self._refuse(worker, launch, Cause.SPAWN_FAILED,
                             f"{worker.worker_id}: its actor on node {node.name} could not start "
                             f"({exc})")
            if "error" in answer:
                self.cluster.kill(actor)
                self._refuse(worker, launch, Cause(answer["error"]), answer["message"],
                             answer.get("hint", ""))
            record = WorkerRecord.begin(worker, launch, pid=answer["pid"],
                                        started_at=self.clock(), log_path=answer["log_path"],
                                        before=self.store.read_record(worker.worker_id))
            record.create_time = answer["create_time"]
            record.start_ticks = answer["start_ticks"]
            self._record_new_run(record)

    def _refuse(self, worker: DesiredWorker, launch: Launch, cause: Cause, message: str,
                hint: str = "") -> NoReturn:
        error = base.SpawnError(cause, message, hint=hint)
        self.fail(worker, launch, message, cause, hint)
        raise error

    # -- stop ------------------------------------------------------------------------------

    def stop(self, worker_id: str, *, keep: Phase | None = None, reason: str = "",
             cause: Cause = Cause.EXITED, grace: float | None = None) -> base.StopResult:
        record = self.store.read_record(worker_id)
        if grace is None:
            grace = (record.spec.shutdown_timeout if record else 30.0) + STOP_MARGIN
        actor = self.cluster.worker(worker_id)
        alive = record is not None and actor is not None and self._exit_code(record) is ALIVE
        self._begin_stop(record, alive)
        outcome, pids = "gone", ()
        if actor is not None:
            try:
                answer = self.cluster.call(actor, "stop", grace, timeout=grace + 30.0)
            except ActorGone:
                answer = {"outcome": "gone", "pids": []}
            if "error" in answer:
                raise base.StopError(answer["error"])
            outcome, pids = answer["outcome"], tuple(answer["pids"])
            self.cluster.kill(actor)
        self._after_stop(worker_id, record, keep, reason, cause)
        if record is not None:
            self._release_gpus(record.spec.node, record.garden)
        detail = {"gone": "already exited", "stopped": "exited after SIGTERM",
                  "killed": "SIGKILLed its process group (it did not exit in time, or left "
                  "processes behind)"}[outcome]
        return base.StopResult(outcome, pids, detail)

    def _release_gpus(self, node: str, node_garden: str) -> None:
        """Give back the Ray leases of the node's GPUs that no running worker uses."""
        with self.cluster.gpu_mutex(node_garden):
            used = {gpu for r in self.store.records(damaged=[])
                    if r.spec.node == node and r.phase in RUNNING for gpu in r.spec.gpus}
            self.cluster.release_gpus(node, used)

    # -- records ---------------------------------------------------------------------------

    def adopt(self, worker: ObservedWorker, desired: DesiredWorker) -> None:
        """Record a worker whose actor runs but has no record, as the garden wants it."""
        try:
            info = self._call(worker.worker_id, "info")
        except ActorGone:
            return
        if not info.get("alive") or info.get("pid") is None:
            return
        record = WorkerRecord.begin(desired, Launch(), pid=info["pid"],
                                    started_at=info.get("create_time") or self.clock(),
                                    log_path=info.get("log_path", ""))
        record.create_time = info.get("create_time")
        if self._probe_ready(record):
            record.mark_ready(self.clock())
        self._record_new_run(record)

    def log_path(self, worker_id: str) -> str | None:
        return None  # on its node: read it with read_log

    def read_log(self, worker_id: str, *, previous: bool = False,
                 limit: int = RUN_LOG_BYTES) -> str | None:
        try:
            return str(self._call(worker_id, "read_log", limit, previous))
        except ActorGone:
            return None

    def startup_log(self, worker_id: str) -> str | None:
        try:
            return str(self._call(worker_id, "startup_log"))
        except ActorGone:
            return None

    # -- observe ---------------------------------------------------------------------------

    def observe(self, *, confirm_health: bool = True) -> Observed:
        damaged: list[str] = []
        records = self.store.records(damaged=damaged)
        with ThreadPoolExecutor(max_workers=min(16, max(1, len(records)))) as pool:
            workers = self._observe_records(records, confirm_health, pool.map)
        by_id = {w.worker_id: w for w in workers}
        notes = [f"ignored: {problem}" for problem in damaged]
        for worker_id in self.cluster.worker_names():
            if worker_id in by_id:
                continue
            orphan = self._orphan(worker_id)
            if orphan is not None:
                by_id[worker_id] = orphan
        ordered = sorted(by_id.values(), key=lambda w: w.worker_id)
        return Observed(tuple(ordered), source=f"Ray cluster at {self.cluster.address}",
                        notes=tuple(notes))

    def _orphan(self, worker_id: str) -> ObservedWorker | None:
        """A worker actor with no record (its record was lost, or its start was interrupted
        before the record was written): what its actor says of it."""
        try:
            info = self._call(worker_id, "info")
        except ActorGone:
            return None
        if not info.get("alive") or info.get("pid") is None:
            return None
        marked = procs.MarkedProcess(
            identity=procs.Identity(info["pid"], info.get("create_time")),
            worker_id=worker_id, spec_hash=info.get("spec_hash", ""),
            cmdline=tuple(info.get("argv", ())),
            cuda_visible_devices=info.get("cuda_visible_devices", ""))
        return _orphan(marked, info.get("node", ""))


__all__ = ["KvRecordStore", "RayRuntime"]
