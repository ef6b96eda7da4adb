"""A writer's session: the state lock held, the runtime opened, plans made and applied.

`apply`, `down` and `watch` run inside one; only one session per state directory at a time.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from gardenctl.errors import GardenError, StalePlanError
from gardenctl.execute import ApplyReport, Progress, execute
from gardenctl.state import StateDir
from gardenctl.workflow import PlanResult, compute_plan


@dataclass
class Session:
    state: StateDir
    command: str
    runtime: object | None = None
    probe: object | None = None

    def bind(self, inventory, garden) -> None:
        """Open the runtime for this inventory; again when the node it names changes (a
        declared inventory renamed while watch runs)."""
        from gardenctl.runtime import open_probe, open_runtime

        node = inventory.nodes[0].name if len(inventory.nodes) == 1 else None
        if self.runtime is None or getattr(self.runtime, "node", None) != node:
            close = getattr(self.probe, "close", None)
            if close:
                close()
            self.runtime = open_runtime(garden, inventory, self.state)
            self.probe = open_probe(inventory)

    def observe(self, garden, inventory):
        self.bind(inventory, garden)
        return self.runtime.observe()  # type: ignore[union-attr]

    def plan(self, garden_path: str, inventory_path: str | None,
             plan_file: str | None = None) -> PlanResult:
        from gardenctl.spec.loader import load_garden

        if plan_file is not None:
            return self._saved_plan(plan_file, garden_path, inventory_path)
        return self.plan_loaded(load_garden(garden_path), inventory_path)

    def plan_loaded(self, loaded, inventory_path: str | None,
                    observed=None) -> PlanResult:
        """Plan ``loaded`` against what runs now: observed here, or the snapshot given (one
        observation serves every plan of a watch pass)."""
        from gardenctl.inventory import resolve_inventory

        inventory = resolve_inventory(loaded.garden, loaded.path, inventory_path)
        self.bind(inventory, loaded.garden)
        if observed is None:
            observed = self.observe(loaded.garden, inventory)
        return compute_plan(loaded, inventory, observed)

    def _saved_plan(self, plan_file: str, garden_path: str,
                    inventory_path: str | None) -> PlanResult:
        from gardenctl.plan.document import plan_from_json

        try:
            with open(plan_file, encoding="utf-8") as handle:
                saved = plan_from_json(json.load(handle))
        except FileNotFoundError:
            raise GardenError(f"{plan_file}: no such plan file") from None
        except ValueError as exc:
            raise GardenError(f"{plan_file}: not a JSON plan ({exc})") from None
        path = saved.garden_file if os.path.exists(saved.garden_file) else garden_path
        fresh = self.plan(path, inventory_path)
        stale = [name for name in ("garden", "inventory", "observed")
                 if fresh.plan.fingerprints.get(name) != saved.fingerprints.get(name)]
        if stale:
            what = {"garden": f"the garden file ({path})", "inventory": "the GPUs",
                    "observed": "the running workers"}
            raise StalePlanError(
                f"{plan_file} is stale: {', '.join(what[s] for s in stale)} changed since it "
                "was made. Make a new one with `gardenctl plan --out`."
            )
        return PlanResult(fresh.loaded, fresh.inventory, fresh.observed, fresh.estimates, saved)

    def apply(self, result: PlanResult, progress: Progress | None = None,
              stop_event=None, on_result=None) -> ApplyReport:
        self.bind(result.inventory, result.loaded.garden)
        return execute(result.plan, self.runtime, environ=os.environ,  # type: ignore[arg-type]
                       probe=self.probe, progress=progress, stop_event=stop_event,
                       on_result=on_result)


@contextmanager
def open_session(state_path: str | None, command: str) -> Iterator[Session]:
    state = StateDir(state_path).ensure()
    with state.lock(command):
        session = Session(state, command)
        try:
            yield session
        finally:
            close = getattr(session.probe, "close", None)
            if close:
                close()
