"""The edges of one planning pass: read the file, the hardware, the running workers and the
models' metadata, then hand values to the pure planner. Commands (plan, apply, watch) call this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from gardenctl.estimate.types import MemoryEstimate
from gardenctl.inventory.model import Inventory
from gardenctl.observe import Observed
from gardenctl.plan.model import Plan
from gardenctl.spec.loader import LoadedGarden


@dataclass(frozen=True)
class PlanResult:
    loaded: LoadedGarden
    inventory: Inventory
    observed: Observed
    estimates: Mapping[str, MemoryEstimate]
    plan: Plan


def compute_plan(loaded: LoadedGarden, inventory: Inventory,
                 observed: Observed) -> PlanResult:
    """Read the models' metadata (the only I/O left), then plan: a pure function of the rest."""
    from gardenctl.planner import gather_estimates, make_plan

    estimates = gather_estimates(loaded.models(), loaded.garden.placement.estimator)
    plan = make_plan(loaded, inventory, observed, estimates, busy_ports(loaded, inventory, observed))
    return PlanResult(loaded, inventory, observed, estimates, plan)


def busy_ports(loaded: LoadedGarden, inventory: Inventory, observed: Observed) -> set[int]:
    """Ports other programs listen on here, when the garden runs here (the local runtime on a
    one-node inventory); the garden's own workers' ports are not counted."""
    if loaded.garden.runtime.kind != "local" or len(inventory.nodes) != 1:
        return set()
    from gardenctl.runtime.processes import listening_ports

    return listening_ports() - set(observed.of_garden(loaded.garden.name).ports().values())


def observe_without_lock(loaded: LoadedGarden, inventory: Inventory,
                         state_path: str | None) -> Observed:
    """What runs now, for read-only commands (plan, status): no lock, nothing changed.

    Nothing is observed where no runtime applies here (a fleet of several declared nodes
    planned from a laptop) or where nothing was ever started (no state directory)."""
    from gardenctl.errors import GardenError
    from gardenctl.runtime import open_runtime
    from gardenctl.state import StateDir

    state = StateDir(state_path)
    if not (state.root / "gardens").is_dir():
        return Observed()
    try:
        runtime = open_runtime(loaded.garden, inventory, state, writable=False)
    except GardenError as exc:
        return Observed(notes=(str(exc),))
    return runtime.observe()
