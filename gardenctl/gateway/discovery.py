"""Which workers the gateway may send requests to: the garden file and the runtime, re-read.

`Discovery.refresh()` is blocking (it reads the file, and the runtime's records and probes):
the gateway calls it in a thread, about once a second. The file is parsed again only when its
bytes change; a version that cannot be used keeps the last good one (like `watch`). The
runtime is opened read-only, as `gardenctl status` opens it: it changes no record and takes no
lock, so the gateway runs beside `apply` and `watch`. Standby workers are routable while they
sleep (their record says READY); the view carries the garden's workers and each standby
model's idle timeout and priority for the gateway's standby keeper (`sleepers`).

A `standby: stop` worker has no record while it is stopped: where it would run (node, GPUs,
claim, port) comes from the plan, computed read-only as `gardenctl status` does (a few hundred
ms) when the file changes and every PLAN_S seconds otherwise, not at every refresh; a plan that
fails keeps the last good one (said once). Its replicas are in the routing table while stopped
(``ready=False``): a request for it has it started (`sleepers`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gardenctl.errors import GardenError
from gardenctl.gateway.standby import Policy
from gardenctl.gateway.upstream import Replica, RoutingTable
from gardenctl.observe import ObservedWorker
from gardenctl.runtime.health import connect_host
from gardenctl.spec.models import GatewaySpec, ModelSpec, env_reference
from gardenctl.vocab import Phase

if TYPE_CHECKING:
    from gardenctl.inventory.model import Inventory
    from gardenctl.plan.model import Step
    from gardenctl.runtime.base import Runtime
    from gardenctl.spec.loader import LoadedGarden
    from gardenctl.state import StateDir
    from gardenctl.workers import DesiredWorker

API_KEY_ENV = "VLLM_API_KEY"
PLAN_S = 10.0  # the plan of stopped `standby: stop` workers is computed again this often


@dataclass(frozen=True)
class GardenView:
    """One observation: what to serve, the gateway's settings, and what went wrong."""

    table: RoutingTable = field(default_factory=RoutingTable)
    settings: GatewaySpec = field(default_factory=GatewaySpec)
    client_key: str | None = field(default=None, repr=False)  # resolved gateway api_key
    missing_key: str | None = None  # the api_key's variable, when it is not set
    usable: bool = False  # a version of the file was read (else /health answers 503)
    problems: tuple[str, ...] = ()  # this refresh's trouble: a broken edit, no runtime
    workers: tuple[ObservedWorker, ...] = ()  # the garden's workers, every phase
    standby: Mapping[str, Policy] = field(default_factory=dict)  # served name -> its policy
    reread: bool = False  # this refresh read a new version of the file
    # the planned `standby: stop` workers (running or not); None: not known (no plan yet)
    stop_planned: tuple[DesiredWorker, ...] | None = None


def routing_table(garden: str, declared: Iterable[str], workers: Iterable[ObservedWorker],
                  environ: Mapping[str, str],
                  stop_planned: Iterable[DesiredWorker] = ()) -> RoutingTable:
    """The ready workers of ``garden`` by served name, each with its own API key resolved; and
    the planned `standby: stop` workers that are not ready (``ready=False``: started on
    demand)."""
    ready: dict[str, list[Replica]] = {}
    seen: set[str] = set()
    for worker in sorted(workers, key=lambda w: w.worker_id):
        if worker.garden != garden or worker.phase != Phase.READY:
            continue
        spec = worker.spec
        seen.add(worker.worker_id)
        ready.setdefault(spec.served_model_name, []).append(Replica(
            worker.worker_id, spec.served_model_name, connect_host(spec.host), spec.port,
            worker_key(spec.env, environ), standby=spec.standby is not None))
    for planned in stop_planned:
        if planned.garden == garden and planned.worker_id not in seen:
            seen.add(planned.worker_id)
            ready.setdefault(planned.served_model_name, []).append(Replica(
                planned.worker_id, planned.served_model_name, connect_host(planned.host),
                planned.port, worker_key(planned.env, environ), standby=True, ready=False))
    return RoutingTable(garden, frozenset(declared),
                        {name: tuple(sorted(replicas, key=lambda r: r.worker_id))
                         for name, replicas in sorted(ready.items())})


def sleeps(worker: ObservedWorker) -> bool:
    """A standby worker in sleep mode: the gateway wakes it and puts it to sleep."""
    standby = worker.spec.standby
    return standby is not None and standby.sleeps


def stops(spec: DesiredWorker) -> bool:
    """A `standby: stop` worker: the gateway has it started on demand, stopped when idle."""
    return spec.standby is not None and spec.standby.mode == "stop"


def standby_policies(models: Iterable[ModelSpec]) -> dict[str, Policy]:
    """Served name -> idle timeout and priority of each standby model (sleep or stop)."""
    return {(m.served_model_name or m.name): Policy(m.standby.idle_timeout, m.priority)
            for m in models if m.standby is not None}


def planned_stop_workers(steps: Iterable[Step]) -> tuple[DesiredWorker, ...]:
    """The `standby: stop` workers a plan's steps place (one each, by worker id)."""
    found: dict[str, DesiredWorker] = {}
    for step in steps:
        worker = step.worker  # an idle one being stopped too: reconcile keeps its place
        if worker is not None and stops(worker):
            found.setdefault(worker.worker_id, worker)
    return tuple(found[k] for k in sorted(found))


def worker_key(env: Iterable[tuple[str, str]], environ: Mapping[str, str]) -> str | None:
    """The worker's VLLM_API_KEY as it was started: a ${NAME} resolved here, or a literal."""
    value = dict(env).get(API_KEY_ENV)
    if value is None:
        return None
    ref = env_reference(value)
    return environ.get(ref) if ref else value


class Discovery:
    def __init__(self, garden_path: str, inventory_path: str | None, state_path: str | None,
                 environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from gardenctl.state import StateDir

        self.garden_path = garden_path
        self.inventory_path = inventory_path
        self.state: StateDir = StateDir(state_path)
        self.environ = os.environ if environ is None else environ
        self._text: bytes | None = None
        self._loaded: LoadedGarden | None = None
        self._inventory: Inventory | None = None
        self._runtime: Runtime | None = None
        self._file_problem: str | None = None
        self.clock = clock
        self._planned: tuple[DesiredWorker, ...] | None = None  # the last good plan's
        self._planned_for: LoadedGarden | None = None  # the version last planned (or tried)
        self._planned_at = -PLAN_S
        self._plan_problem: str | None = None

    @property
    def runtime(self) -> Runtime | None:
        """The runtime opened by the last refresh (None before, or where none applies)."""
        return self._runtime

    def observe(self) -> list[ObservedWorker]:
        """The garden's workers now (blocking: call it in a thread); [] without a runtime."""
        runtime, loaded = self._runtime, self._loaded
        if runtime is None or loaded is None:
            return []
        return [w for w in runtime.observe(confirm_health=False).workers
                if w.garden == loaded.garden.name]

    def refresh(self) -> GardenView:
        before = self._loaded
        problems = self._reload()
        loaded = self._loaded
        if loaded is None:
            return GardenView(problems=tuple(problems))
        garden = loaded.garden
        settings = garden.gateway or GatewaySpec()
        client_key, missing = None, None
        if settings.api_key is not None:
            variable = env_reference(settings.api_key) or ""
            client_key = self.environ.get(variable) or None
            missing = None if client_key else variable
        declared = [m.served_model_name or m.name for m in loaded.models()]
        workers: list[ObservedWorker] = []
        runtime = self._open_runtime(problems)
        if runtime is not None:
            workers = list(runtime.observe(confirm_health=False).workers)
        planned = self._stop_planned(loaded, problems)
        table = routing_table(garden.name, declared, workers, self.environ, planned or ())
        return GardenView(table, settings, client_key, missing, True, tuple(problems),
                          tuple(w for w in workers if w.garden == garden.name),
                          standby_policies(loaded.models()), loaded is not before, planned)

    def watch_running(self) -> bool:
        """A `gardenctl watch` of the garden runs now (it starts and stops `standby: stop`
        workers on the demand file). Blocking (a file and a process): call it in a thread."""
        from gardenctl.status import watch_running

        loaded = self._loaded
        return (loaded is not None and self.state.exists
                and watch_running(self.state, loaded.garden.name))

    def _stop_planned(self, loaded: LoadedGarden,
                      problems: list[str]) -> tuple[DesiredWorker, ...] | None:
        """The planned `standby: stop` workers: () when the garden has none; planned again
        for a new version of the file or after PLAN_S seconds; the last good ones (None before
        any) when planning fails."""
        from gardenctl.workflow import plan_read_only

        if not any(m.standby is not None and m.standby.mode == "stop" for m in loaded.models()):
            self._planned, self._planned_for = (), loaded
            return ()
        now = self.clock()
        if loaded is self._planned_for and now - self._planned_at < PLAN_S:
            return self._planned
        self._planned_at, self._planned_for = now, loaded
        inventory = self._inventory
        try:
            if inventory is None:
                raise GardenError("no inventory")
            result = plan_read_only(loaded, inventory, self.state, preflight=False)
        except Exception as exc:  # noqa: BLE001 - the last good plan stays in use
            text = (f"planning the stopped (standby: stop) workers failed; "
                    f"{'the last plan stays' if self._planned else 'they cannot be started'}: "
                    f"{type(exc).__name__}: {exc}")
            if text != self._plan_problem:
                self._plan_problem = text
                problems.append(text)
            return self._planned
        self._planned, self._plan_problem = planned_stop_workers(result.plan.steps), None
        return self._planned

    def _reload(self) -> list[str]:
        """Parse the file again if its bytes changed; what went wrong, once per version."""
        from gardenctl.inventory import resolve_inventory
        from gardenctl.spec.loader import load_garden

        try:
            text = Path(self.garden_path).read_bytes()
        except OSError as exc:
            return self._problem(f"cannot read {self.garden_path}: {exc.strerror or exc}")
        if text == self._text:
            return []
        self._text = text
        try:
            loaded = load_garden(self.garden_path)
            inventory = resolve_inventory(loaded.garden, self.garden_path, self.inventory_path)
        except GardenError as exc:
            kept = "; serving the last good version" if self._loaded is not None else ""
            return self._problem(f"{self.garden_path} cannot be used{kept}: {exc}", force=True)
        if self._loaded is None or (loaded.garden.name, loaded.garden.runtime) != (
                self._loaded.garden.name, self._loaded.garden.runtime):
            self._runtime = None  # another garden or runtime: open it again
        self._loaded, self._inventory, self._file_problem = loaded, inventory, None
        return []

    def _problem(self, text: str, *, force: bool = False) -> list[str]:
        if text == self._file_problem and not force:
            return []
        self._file_problem = text
        return [text]

    def _open_runtime(self, problems: list[str]) -> Runtime | None:
        from gardenctl.workflow import read_only_runtime

        if self._runtime is None and self._loaded is not None and self._inventory is not None:
            notes: list[str] = []
            self._runtime = read_only_runtime(self._loaded, self._inventory, self.state, notes)
            problems += notes
        return self._runtime


__all__ = ["PLAN_S", "Discovery", "GardenView", "planned_stop_workers", "routing_table",
           "sleeps", "standby_policies", "stops", "worker_key"]
