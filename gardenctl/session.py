"""A writer's session: its garden's lock held, the runtime opened, plans made and applied.

`apply`, `down` and `watch` run inside one. Each garden has its own lock, so work on one garden
never waits for another's (gardens that share GPUs still never start two workers on one GPU at
once: see StateDir.gpu_lock).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from gardenctl.errors import GardenError, StalePlanError, StateError
from gardenctl.execute import ApplyReport, Executor, Progress, StepResult
from gardenctl.inventory.model import Inventory
from gardenctl.lessons import Lesson
from gardenctl.observe import History, Observed
from gardenctl.plan.model import Plan, Step
from gardenctl.profiles.model import Profile
from gardenctl.runtime import base
from gardenctl.spec.loader import LoadedGarden
from gardenctl.spec.models import Garden
from gardenctl.state import StateDir
from gardenctl.vocab import Blocker
from gardenctl.workflow import PlanResult, circumstances, compute_plan


@dataclass
class Session:
    state: StateDir
    command: str
    runtime: base.Runtime | None = None
    probe: base.GpuProbe | None = None
    locked: set[str] = field(default_factory=set)
    clock: Callable[[], float] = time.time  # wall clock: "now" for the plans (backoff, timeouts)
    learned_runs: set[tuple[str, float]] = field(default_factory=set)  # (worker, start) learned
    learn_problem: str = ""  # why the last learning failed (a damaged profile database)
    new_lessons: list[Lesson] = field(default_factory=list)  # learned by the last pass
    _stack: ExitStack = field(default_factory=ExitStack)

    def lock(self, garden: str, spec: Garden | None = None) -> None:
        """Take ``garden``'s writer lock for the rest of the session (LockHeldError if another
        apply, down or watch of it holds it); ``spec``: the garden, whose runtime may lock
        across machines too (a Ray cluster)."""
        from gardenctl.runtime import garden_lock

        if garden not in self.locked:
            self._stack.enter_context(garden_lock(spec, garden, self.state, self.command))
            self.locked.add(garden)

    def close(self) -> None:
        close = getattr(self.probe, "close", None)
        if close:
            close()
        self._stack.close()

    def bind(self, inventory: Inventory, garden: Garden | None) -> base.Runtime:
        """Open the runtime for this inventory; again when the node it names changes (a
        declared inventory renamed while watch runs)."""
        from gardenctl.runtime import open_probe, open_runtime, runtime_spec

        spec = runtime_spec(garden)
        if spec.kind == "ray":  # one cluster per process (runtime.ray.connect)
            node: str | None = "ray"
            current = "ray" if getattr(self.runtime, "name", "") == "ray" else None
        else:
            node = inventory.nodes[0].name if len(inventory.nodes) == 1 else None
            current = getattr(self.runtime, "node", None)
        if self.runtime is None or current != node:
            close = getattr(self.probe, "close", None)
            if close:
                close()
            self.runtime = open_runtime(garden, inventory, self.state, gardens=self.locked)
            self.probe = open_probe(inventory, garden)
        return self.runtime

    def plan(self, garden_path: str, inventory_path: str | None, *,
             detect: bool = True) -> PlanResult:
        from gardenctl.spec.loader import load_garden

        loaded = load_garden(garden_path)
        self.lock(loaded.garden.name, loaded.garden)
        return self.plan_loaded(loaded, inventory_path, detect=detect)

    def plan_loaded(self, loaded: LoadedGarden, inventory_path: str | None,
                    observed: Observed | None = None, *, confirm_health: bool = True,
                    in_flight: frozenset[str] = frozenset(), detect: bool = True,
                    learn: bool = False, preflight: bool = True) -> PlanResult:
        """Plan ``loaded`` against what runs now: observed here, or the snapshot given (one
        observation serves every plan of a watch pass). ``in_flight``: workers this
        gardenctl is acting on right now (the plan waits for them). ``detect``: ask each
        vllm_command its release (what `plan` cannot do, so a saved plan's apply does not);
        ``learn``: first learn from workers that became ready (watch; apply learns after it
        ran, so that its plan is the one `plan` shows)."""
        from gardenctl.inventory import resolve_inventory

        inventory = resolve_inventory(loaded.garden, loaded.path, inventory_path)
        runtime = self.bind(inventory, loaded.garden)
        if observed is None:
            observed = runtime.observe(confirm_health=confirm_health)
        observed = observed.with_in_flight(in_flight)
        world = circumstances(loaded, inventory, observed, self.state, now=self.clock())
        result = compute_plan(loaded, inventory, observed, world, self.state, detect=detect,
                              preflight=preflight)
        if learn and (self.learn(result) or self.record_lessons(result)):
            # a worker became ready (size from what it measured), or a start failed for
            # memory (resize from what its log said): plan again with it
            result = compute_plan(loaded, inventory, observed, world, self.state, detect=detect,
                                  preflight=preflight)
        return result

    def record_lessons(self, result: PlanResult, observed: Observed | None = None) -> bool:
        """Learn from each of the garden's workers whose last start failed for memory
        (gardenctl.lessons); True when a lesson was added or changed."""
        from gardenctl.lessons import learn as learn_lesson
        from gardenctl.workers import sizing_hash

        self.new_lessons = []
        if not self.state.exists:
            return False
        garden = result.loaded.garden
        lessons = self.state.read_lessons(garden.name)
        declared = {m.name: m for m in result.loaded.declared_models()}
        changed = False
        for worker in (observed or result.observed).of_garden(garden.name).workers:
            model = declared.get(worker.model)
            estimate = result.estimates.get(worker.model)
            if not worker.phase.dead or model is None or estimate is None:
                continue
            gpu = result.inventory.gpu(worker.node, worker.gpus[0]) if worker.gpus else None
            lesson = learn_lesson(worker, model, sizing_hash(model, garden.placement), estimate,
                                  gpu.total_bytes if gpu else None, lessons.get(model.name))
            if lesson is not None:
                lessons[model.name] = lesson
                self.new_lessons.append(lesson)
                changed = True
        if changed:
            self.state.write_lessons(garden.name, lessons)
        return changed

    def learn(self, result: PlanResult, observed: Observed | None = None) -> list[Profile]:
        """Record a profile for each of the garden's ready workers not learned yet (read from
        its start-up log, once per run); the next plan sizes its model from it."""
        from gardenctl.profiles.learn import learn_ready
        from gardenctl.profiles.store import ProfileStore

        if not self.state.exists or self.runtime is None:
            return []
        garden = result.loaded.garden.name
        workers = (observed or result.observed).of_garden(garden).workers
        versions = {name: None if e.vllm_version_assumed else e.vllm_version
                    for name, e in result.estimates.items()}
        try:
            learned = learn_ready(workers, self.runtime.startup_log, result.inventory,
                                  ProfileStore.in_state(self.state.root), versions,
                                  seen=self.learned_runs)
        except StateError as exc:  # learning is a refinement: apply and watch go on
            self.learn_problem = f"nothing learned from the workers' start-ups: {exc}"
            return []
        self.learn_problem = ""
        return learned

    def plan_when_gpus_free(self, result: PlanResult, inventory_path: str | None,
                            on_wait: Callable[[str], None], poll: float = 0.5) -> PlanResult:
        """For apply: while the plan waits for a GPU where another garden's worker loads or
        stops, wait (saying why, once per change) and plan again; up to the longest start
        timeout of the waiting workers, after which the plan says they still wait."""
        waits = _gpu_waits(result.plan)
        if not waits:
            return result
        deadline = time.monotonic() + max(step.spec.start_timeout for step in waits)
        said = ""
        while waits and time.monotonic() < deadline:
            if waits[0].cause != said:
                said = waits[0].cause
                on_wait(f"{waits[0].worker_id}: {said}")
            time.sleep(poll)
            result = self.plan_loaded(result.loaded, inventory_path, detect=False)
            waits = _gpu_waits(result.plan)
        return result

    def check_saved(self, plan_file: str, result: PlanResult) -> None:
        """Refuse a saved plan unless it is exactly the plan made now (StalePlanError)."""
        from gardenctl.plan.document import check_saved_plan, plan_to_json, saved_plan_difference

        try:
            with open(plan_file, encoding="utf-8") as handle:
                saved = check_saved_plan(json.load(handle))
        except FileNotFoundError:
            raise GardenError(f"{plan_file}: no such plan file") from None
        except (OSError, ValueError) as exc:
            raise GardenError(f"{plan_file}: not a JSON plan ({exc})") from None
        fresh: dict[str, Any] = json.loads(json.dumps(plan_to_json(result.plan)))
        difference = saved_plan_difference(saved, fresh)
        if difference is not None:
            raise StalePlanError(f"{plan_file} is stale or was edited ({difference}): nothing "
                                 "was changed. Make a new plan with `gardenctl plan --out` and "
                                 "review it.")

    def record_applied(self, result: PlanResult, by: str) -> None:
        """Remember which workers the garden wanted when it was last applied (plans use it to
        say why a worker is missing: `down`, an interrupted apply, ...)."""
        garden = result.plan.garden
        wanted = frozenset(s.worker_id for s in result.plan.steps if s.worker is not None)
        before = self.state.read_history(garden)
        if before.applied_workers == wanted and before.applied_by == by:
            return
        self.state.write_history(garden, History(
            applied_at=self.clock(), applied_by=by, applied_workers=wanted,
            down_at=before.down_at, down_workers=before.down_workers))

    def executor(self, result: PlanResult, progress: Progress | None = None,
                 stop_event: threading.Event | None = None) -> Executor:
        runtime = self.bind(result.inventory, result.loaded.garden)
        return Executor(runtime, environ=os.environ, probe=self.probe, progress=progress,
                        stop_event=stop_event)

    def apply(self, result: PlanResult, progress: Progress | None = None,
              stop_event: threading.Event | None = None,
              on_result: Callable[[StepResult], None] | None = None) -> ApplyReport:
        """Run every step of the plan (remembering what the garden wanted, for later plans)."""
        self.record_applied(result, "apply")
        report = self.executor(result, progress, stop_event).run(result.plan, on_result)
        if self.runtime is not None:
            after = self.runtime.observe(confirm_health=False)
            self.learn(result, after)
            self.record_lessons(result, after)
        return report


def _gpu_waits(plan: Plan) -> list[Step]:
    return [s for s in plan.steps if s.blocked_by == Blocker.GPU]


@contextmanager
def open_session(state_path: str | None, command: str) -> Iterator[Session]:
    """A writer's session; gardens are locked as the session learns which (`Session.lock`)."""
    session = Session(StateDir(state_path).ensure(), command)
    try:
        yield session
    finally:
        session.close()


__all__ = ["Session", "open_session"]
