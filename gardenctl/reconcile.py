"""reconcile(): desired workers + what runs -> ordered actions, each with a cause in plain words.

Pure. Unchanged spec hash -> keep; changed -> replace; running but no longer wanted -> stop;
wanted but not running -> start. A worker whose new version could not be placed keeps running
as it is (the plan lists it as unplaced), so a bad edit never takes a model down.
"""

from __future__ import annotations

from typing import Sequence

from gardenctl.observe import CRASHED, STARTING, STOPPED, Observed, ObservedWorker
from gardenctl.placement.model import Unplaced
from gardenctl.plan.model import ACTION_ORDER, KEEP, REPLACE, START, STOP, Action
from gardenctl.workers import DesiredWorker


def reconcile(desired: Sequence[DesiredWorker], observed: Observed,
              unplaced: Sequence[Unplaced] = ()) -> tuple[Action, ...]:
    actions: list[Action] = []
    wanted = {w.worker_id: w for w in desired}
    held_back = {u.worker_id: u for u in unplaced if u.kept_previous}
    observed_models = {w.model for w in observed.workers if w.running}
    for worker in desired:
        current = observed.get(worker.worker_id)
        if current is None or not current.running:
            actions.append(Action(START, worker.worker_id, worker.model,
                                  _start_cause(worker, current, observed_models), worker=worker,
                                  previous=current))
        elif current.spec_hash != worker.spec_hash:
            actions.append(Action(REPLACE, worker.worker_id, worker.model,
                                  describe_change(current, worker), worker=worker,
                                  previous=current))
        else:
            if not current.has_record:
                cause = "found running with the same spec but no record: adopting it"
            elif current.phase == STARTING:
                cause = "up to date, still loading"
            else:
                cause = "up to date"
            actions.append(Action(KEEP, worker.worker_id, worker.model, cause, worker=worker,
                                  previous=current))
    desired_models = {w.model for w in desired} | {u.model for u in unplaced}
    for current in observed.workers:
        if current.worker_id in wanted:
            continue
        if not current.running:
            if current.has_record:
                actions.append(Action(STOP, current.worker_id, current.model,
                                      _stop_cause(current, desired_models)
                                      + " (already exited; its record is removed)",
                                      previous=current))
            continue
        if current.worker_id in held_back:
            actions.append(Action(KEEP, current.worker_id, current.model,
                                  "its new version does not fit (see unplaced); the running "
                                  "version stays", previous=current))
            continue
        actions.append(Action(STOP, current.worker_id, current.model,
                              _stop_cause(current, desired_models), previous=current))
    return tuple(sorted(actions, key=lambda a: (ACTION_ORDER[a.action], a.worker_id)))


def _start_cause(worker: DesiredWorker, current: ObservedWorker | None,
                 running_models: set[str]) -> str:
    if current is not None and current.phase == CRASHED:
        code = current.exit_code
        if code is not None and code < 0:
            detail = f"killed by signal {-code}"
        else:
            detail = f"exited with code {code}" if code is not None else "exited"
            if current.last_error and current.last_error != detail:
                detail = (current.last_error if current.last_error.startswith(detail)
                          else f"{detail}: {current.last_error}")
        return f"not running ({detail}); starting it again"
    if current is not None and current.phase == STOPPED:
        return "stopped; starting it again"
    if worker.model in running_models:
        return f"replica {worker.replica} of {worker.model} added"
    return f"model {worker.model} added to the garden"


def _stop_cause(current: ObservedWorker, desired_models: set[str]) -> str:
    if not current.has_record:
        return "found running with our marker but no record, and the garden does not want it"
    if current.model in desired_models:
        return f"replica {current.replica} of {current.model} no longer wanted"
    return f"model {current.model} removed from the garden"


def describe_change(current: ObservedWorker, worker: DesiredWorker) -> str:
    """What differs between the running worker and the wanted one, flag by flag."""
    parts = []
    if (current.node, current.gpus) != (worker.node, worker.gpus):
        parts.append(f"moves from {_where(current.node, current.gpus)} to "
                     f"{_where(worker.node, worker.gpus)}")
    old_flags, old_rest = _flags(current.argv)
    new_flags, new_rest = _flags(worker.argv)
    if old_rest != new_rest:
        parts.append(f"command {' '.join(old_rest)!s} -> {' '.join(new_rest)!s}")
    for name in sorted(set(old_flags) | set(new_flags)):
        before, after = old_flags.get(name), new_flags.get(name)
        if before == after:
            continue
        label = name.lstrip("-")
        if before is None:
            parts.append(f"{label} added" + (f" ({after})" if after != "" else ""))
        elif after is None:
            parts.append(f"{label} removed")
        else:
            parts.append(f"{label} {before or 'on'} -> {after or 'on'}")
    old_env, new_env = dict(current.env), dict(worker.env)
    for name in sorted(set(old_env) | set(new_env)):
        if name not in old_env:
            parts.append(f"env {name} added")
        elif name not in new_env:
            parts.append(f"env {name} removed")
        elif old_env[name] != new_env[name]:
            parts.append(f"env {name} changed")  # values may be secrets: names only
    if not parts:
        parts.append("spec changed")
    return "; ".join(parts)


def _where(node: str, gpus: tuple[int, ...]) -> str:
    return f"{node} GPU {','.join(map(str, gpus))}"


def _flags(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Split argv into {--flag: value or ''} and the positional words before the first flag."""
    flags: dict[str, str] = {}
    head: list[str] = []
    i = 0
    while i < len(argv) and not argv[i].startswith("-"):
        head.append(argv[i])
        i += 1
    while i < len(argv):
        word = argv[i]
        if word.startswith("-") and "=" in word:
            name, value = word.split("=", 1)
            flags[name] = value
            i += 1
        elif word.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            flags[word] = argv[i + 1]
            i += 2
        else:
            flags[word] = ""
            i += 1
    return flags, head
