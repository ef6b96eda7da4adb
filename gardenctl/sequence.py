"""Order a plan's steps and write down what each waits for.

The rules come from what vLLM does on a shared GPU (docs/vllm.md):

- while a worker loads on a GPU, nothing else there starts *or stops*: its memory profiling
  reads device-wide free memory, and a neighbour that allocates or frees meanwhile corrupts it;
- a GPU's stops come before its starts, and a start needs them done (their memory released);
- one start at a time per GPU; different GPUs go in parallel;
- the replicas of a model are replaced at most `max_unavailable` at a time, each after the
  previous one is ready; a replacement that fails is rolled back, and the rollout stops there.

Each rule becomes a `Needs` on the step (DONE, FAILED or FINISHED of another step), so the
plan shows it and the executor only follows it. Steps are ordered: waits on loading workers,
adoptions, stops, restarts and rollbacks (service back first), replacements, new workers, then
what only reports (holds, waits, keeps); within a group by model and replica. Pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from gardenctl.observe import Observed
from gardenctl.plan.model import GpuKey, Needs, Step, When
from gardenctl.vocab import Phase, StepKind
from gardenctl.workers import DesiredWorker

_GROUP = {
    StepKind.AWAIT: 0, StepKind.ADOPT: 1, StepKind.STOP: 2, StepKind.STOP_LEFTOVERS: 2,
    StepKind.RESTART: 3, StepKind.ROLLBACK: 3, StepKind.REPLACE: 4, StepKind.START: 5,
    StepKind.HOLD: 6, StepKind.WAIT: 6, StepKind.KEEP: 7,
}
_STOPS = (StepKind.STOP, StepKind.STOP_LEFTOVERS)


def _replica(step: Step) -> int:
    return int(step.worker_id.rsplit("/", 1)[1])


def _order(step: Step, steps_by_id: dict[str, Step]) -> tuple[int, str, int, int]:
    if step.conditional:  # a rollback sorts right after the replacement it may undo
        parent = steps_by_id[step.after[0].step_id]
        return (_GROUP[parent.kind], parent.model, _replica(parent), 1)
    return (_GROUP[step.kind], step.model, _replica(step), 0)


def sequence(steps: Sequence[Step]) -> tuple[Step, ...]:
    """The steps in the order they may begin, each with the GPU rules as dependencies."""
    by_id = {s.id: s for s in steps}
    ordered = sorted(steps, key=lambda s: _order(s, by_id))
    loading: dict[GpuKey, list[str]] = {}  # awaited loads (and operations in flight)
    stops: dict[GpuKey, list[str]] = {}
    tail: dict[GpuKey, list[str]] = {}  # the last start on each GPU (and its rollback)
    result = []
    for step in ordered:
        keys = step.gpu_keys
        needs = list(step.after)
        if step.kind == StepKind.AWAIT:
            _register(loading, keys, step.id)
        elif step.kind in _STOPS:
            needs += [Needs(i, When.FINISHED) for k in sorted(keys) for i in loading.get(k, ())]
            _register(stops, keys, step.id)
        elif step.kind.spawns and step.conditional:
            keys = keys | by_id[step.after[0].step_id].gpu_keys
            for key in keys:
                tail.setdefault(key, []).append(step.id)
        elif step.kind.spawns:
            for key in sorted(keys):
                needs += [Needs(i, When.FINISHED) for i in loading.get(key, ())]
                needs += [Needs(i, When.DONE) for i in stops.get(key, ()) if i != step.id]
                needs += [Needs(i, When.FINISHED) for i in tail.get(key, ())]
                tail[key] = [step.id]
        result.append(dataclasses.replace(step, after=_dedupe(needs)))
    return tuple(result)


def _register(table: dict[GpuKey, list[str]], keys: frozenset[GpuKey], step_id: str) -> None:
    for key in keys:
        table.setdefault(key, []).append(step_id)


def _dedupe(needs: list[Needs]) -> tuple[Needs, ...]:
    """One need per step, the strictest (DONE or FAILED over FINISHED), in first-seen order."""
    chosen: dict[str, Needs] = {}
    for need in needs:
        known = chosen.get(need.step_id)
        if known is None or known.when == When.FINISHED:
            chosen[need.step_id] = need
    return tuple(chosen.values())


def chain_rollout(steps: Sequence[Step], workers: Sequence[DesiredWorker], observed: Observed,
                  replicas: int, max_unavailable: int) -> dict[str, Step | None]:
    """Pace the replacements of one model's ready replicas (see the module docstring).
    ``steps`` are that model's steps; returns the steps to change, by id (None: drop it)."""
    replaces = sorted((s for s in steps if s.kind == StepKind.REPLACE
                       and s.previous is not None and s.previous.phase == Phase.READY),
                      key=_replica)
    if not replaces:
        return {}
    replaced = {s.worker_id for s in replaces}
    down = sorted(w.worker_id for w in workers if w.worker_id not in replaced and (
        (o := observed.get(w.worker_id)) is None or o.phase != Phase.READY))
    revivers = {s.worker_id: s for s in steps if s.worker_id in down and not s.conditional
                and (s.kind.spawns or s.kind in (StepKind.AWAIT, StepKind.ADOPT))}
    if len(down) >= max_unavailable and any(w not in revivers for w in down):
        return _pause(replaces, down, max_unavailable)
    first_needs = [Needs(revivers[w].id) for w in down] if len(down) >= max_unavailable else []
    width = max_unavailable if first_needs else max_unavailable - len(down)
    notes = _notes(replicas, max_unavailable)
    changed: dict[str, Step | None] = {}
    for i, step in enumerate(replaces):
        needs = list(step.after) + (first_needs if i < width else [])
        if i >= width:
            needs.append(Needs(replaces[i - width].id))
        changed[step.id] = dataclasses.replace(step, after=tuple(needs), notes=notes)
    return changed


def _notes(replicas: int, max_unavailable: int) -> tuple[str, ...]:
    if replicas <= 1:
        availability = "the model is unavailable until its new version is ready (1 replica)"
    else:
        availability = (f"one of {replicas} replicas at a time" if max_unavailable == 1 else
                        f"at most {max_unavailable} of {replicas} replicas down at once")
    return (availability, "if the new version does not become ready, the running one is "
            "started again and the rollout stops")


def _pause(replaces: list[Step], down: list[str],
           max_unavailable: int) -> dict[str, Step | None]:
    """The rollout cannot go on: replicas are down with nothing that brings them back now."""
    names = ", ".join(w.rsplit("/", 1)[1] for w in down)
    changed: dict[str, Step | None] = {}
    for step in replaces:
        changed[step.id] = dataclasses.replace(
            step, kind=StepKind.WAIT, launch=None, notes=(),
            cause=f"rollout waits: replica(s) {names} of {step.model} not ready, and at most "
                  f"{max_unavailable} may be down at once; then: {step.cause}")
        changed[f"{StepKind.ROLLBACK.value}:{step.worker_id}"] = None  # nothing to roll back
    return changed


__all__ = ["chain_rollout", "sequence"]
