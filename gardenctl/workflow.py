"""The edges of one planning pass: read the file, the hardware, the running workers, the
models' metadata and the circumstances (time, environment names, ports, history), then hand
values to the pure planner. Commands (plan, status, apply, watch) call this.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from gardenctl.estimate.types import MemoryEstimate
from gardenctl.inventory.model import Inventory
from gardenctl.lessons import Lesson
from gardenctl.observe import History, Observed
from gardenctl.plan.model import Plan
from gardenctl.reconcile import Circumstances
from gardenctl.spec.loader import LoadedGarden
from gardenctl.state import StateDir
from gardenctl.vocab import Phase

if TYPE_CHECKING:
    from gardenctl.runtime.base import Runtime


@dataclass(frozen=True)
class PlanResult:
    loaded: LoadedGarden
    inventory: Inventory
    observed: Observed  # every garden's workers in the state directory
    estimates: Mapping[str, MemoryEstimate]
    plan: Plan


def compute_plan(loaded: LoadedGarden, inventory: Inventory, observed: Observed,
                 world: Circumstances | None = None,
                 state: StateDir | None = None, *, detect: bool = False,
                 preflight: bool = True) -> PlanResult:
    """Read the models' metadata and the vLLM release of each vllm_command (the only I/O
    left; the release is cached in ``state``), then plan: a pure function of the rest.

    With ``preflight`` (every plan of a garden version about to be applied), what vLLM would
    refuse at start-up (gardenctl.preflight: max_model_len, tensor parallelism, dtype and
    quantization on these GPUs, the architecture) is a SpecError located in the file, as in
    `validate`, and nothing is planned; its warnings join the plan's."""
    from gardenctl.errors import SpecError
    from gardenctl.estimate import read_model_metadata
    from gardenctl.planner import gather_estimates, make_plan
    from gardenctl.validation import SaneMetadataReader, preflight_issues
    from gardenctl.vllm_version import declared_or_detected

    cache = state.root if state is not None and state.root.is_dir() else None
    lessons: dict[str, Lesson] = {}
    if state is not None and state.exists:
        loaded, lessons = with_lessons(loaded, state)
    reader = SaneMetadataReader(read_model_metadata)
    estimates: Mapping[str, MemoryEstimate] = gather_estimates(
        loaded.models(), loaded.garden.placement.estimator, read_metadata=reader,
        version_of=declared_or_detected(cache, probe=detect))
    if preflight:
        issues = preflight_issues(loaded, loaded.models(), inventory, estimates, reader)
        errors = [i for i in issues if i.severity == "error"]
        if errors:
            raise SpecError(errors)
        loaded = replace(loaded, warnings=(*loaded.warnings, *issues))
    if state is not None:
        estimates = measured_sizing(loaded, inventory, estimates, state)
    if lessons:
        estimates = {name: replace(e, warnings=(*e.warnings, "resized after a failed start: "
                                                + lessons[name].reason))
                     if name in lessons else e for name, e in estimates.items()}
    plan = make_plan(loaded, inventory, observed, estimates, world)
    return PlanResult(loaded, inventory, observed, estimates, plan)


def with_lessons(loaded: LoadedGarden, state: StateDir) -> tuple[LoadedGarden, dict[str, Lesson]]:
    """The garden with what failed starts taught applied to the models it still applies to
    (gardenctl.lessons): the models as they will run, and those lessons by model."""
    from gardenctl.lessons import applicable
    from gardenctl.workers import sizing_hash

    policy = loaded.garden.placement
    declared = {m.name: sizing_hash(m, policy) for m in loaded.declared_models()}
    lessons = applicable(state.read_lessons(loaded.garden.name), declared)
    return loaded.with_overrides({n: lesson.overrides() for n, lesson in lessons.items()}), lessons


def measured_sizing(loaded: LoadedGarden, inventory: Inventory,
                    estimates: Mapping[str, MemoryEstimate],
                    state: StateDir) -> Mapping[str, MemoryEstimate]:
    """Each model sized from its learned profile where one matches (same model, settings,
    vLLM release and GPU model), else from the estimate (gardenctl.profiles.sizing)."""
    from gardenctl.errors import StateError
    from gardenctl.profiles.sizing import sized_estimates
    from gardenctl.profiles.store import ProfileStore

    try:
        profiles = ProfileStore.in_state(state.root).all()
    except StateError as exc:  # profiles only refine the plan: it goes on without them
        note = f"sized from the static estimate: {exc}"
        return {name: replace(e, warnings=(*e.warnings, note)) for name, e in estimates.items()}
    return sized_estimates(loaded.models(), estimates, inventory, profiles)


def circumstances(loaded: LoadedGarden, inventory: Inventory, observed: Observed,
                  state: StateDir, *, environ: Mapping[str, str] | None = None,
                  now: float | None = None) -> Circumstances:
    """What the plan needs to know of the world besides the file and the workers."""
    environ = os.environ if environ is None else environ
    return Circumstances(
        now=time.time() if now is None else now,
        env_names=frozenset(environ),
        busy_ports=busy_ports(loaded, inventory, observed),
        busy_gpus=busy_gpus(loaded.garden.name, observed),
        history=state.read_history(loaded.garden.name) if state.exists else History(),
        demand=frozenset(state.read_demand(loaded.garden.name)) if state.exists
        else frozenset(),
    )


def busy_ports(loaded: LoadedGarden, inventory: Inventory, observed: Observed) -> dict[int, str]:
    """Ports in use here by anything but this garden's live workers (port -> who), when the
    garden runs here (the local runtime on a one-node inventory): the ports other programs
    listen on, and those of other gardens' workers (a loading worker may not listen yet). A
    dead worker of the garden owns no port: whoever listens on it now is another program."""
    if len(inventory.nodes) != 1 or _runtime_kind(loaded) != "local":
        return {}
    from gardenctl.runtime.processes import listening_ports

    garden = loaded.garden.name
    ours = {w.port for w in observed.of_garden(garden).workers if w.running or w.pids}
    busy = {port: who for port, who in listening_ports().items() if port not in ours}
    busy.update((w.port, f"worker {w.worker_id}") for w in observed.workers
                if w.garden != garden and (w.running or w.pids))
    return dict(sorted(busy.items()))


def busy_gpus(garden: str, observed: Observed) -> dict[tuple[str, int], str]:
    """GPUs where another garden's worker is loading or being stopped ((node, index) -> who,
    doing what): this garden starts and stops nothing there meanwhile."""
    busy: dict[tuple[str, int], str] = {}
    for worker in observed.workers:
        if worker.garden == garden or worker.phase not in (Phase.STARTING, Phase.STOPPING):
            continue
        doing = "loading" if worker.phase == Phase.STARTING else "stopping"
        for index in worker.gpus:
            busy.setdefault((worker.node, index), f"{worker.worker_id} is {doing} there")
    return busy


def read_only_runtime(loaded: LoadedGarden, inventory: Inventory, state: StateDir,
                      notes: list[str] | None = None) -> Runtime | None:
    """The garden's runtime opened read-only (it changes no record), or None where no runtime
    applies here (a fleet of several declared nodes planned from a laptop; why, in ``notes``)
    or where nothing was ever started (the local runtime with no state directory; a Ray
    cluster keeps its own state, so an empty state directory sees it all)."""
    from gardenctl.errors import GardenError
    from gardenctl.runtime import open_runtime, runtime_spec

    if runtime_spec(loaded.garden).kind == "local" and not state.exists:
        return None
    try:
        return open_runtime(loaded.garden, inventory, state, writable=False)
    except GardenError as exc:
        if notes is not None:
            notes.append(str(exc))
        return None


def observe_without_lock(loaded: LoadedGarden, inventory: Inventory,
                         state: StateDir) -> Observed:
    """What runs now, for read-only commands (plan, status): no lock, nothing changed."""
    notes: list[str] = []
    runtime = read_only_runtime(loaded, inventory, state, notes)
    return runtime.observe() if runtime is not None else Observed(notes=tuple(notes))


def plan_read_only(loaded: LoadedGarden, inventory: Inventory, state: StateDir, *,
                   preflight: bool = True) -> PlanResult:
    """The plan as `plan` and `status` show it: observed without the lock, changing nothing
    (`status` shows what runs even when the file has a pre-flight error: ``preflight``)."""
    observed = observe_without_lock(loaded, inventory, state)
    return compute_plan(loaded, inventory, observed,
                        circumstances(loaded, inventory, observed, state), state,
                        preflight=preflight)


__all__ = ["PlanResult", "busy_gpus", "busy_ports", "circumstances", "compute_plan",
           "measured_sizing", "observe_without_lock", "plan_read_only", "read_only_runtime"]


def _runtime_kind(loaded: LoadedGarden) -> str:
    from gardenctl.runtime import runtime_spec

    return runtime_spec(loaded.garden).kind
