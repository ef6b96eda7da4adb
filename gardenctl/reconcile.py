"""reconcile(): what the garden wants + what runs + the circumstances -> every step, with causes.

Pure: values in, values out (the time and the environment's variable *names* are inputs too).
For each worker the garden wants, by what its last observation says:

    nothing runs                 -> start (or wait: an unset secret, a port another program holds)
    loading                      -> await it (or restart it once past its start timeout)
    ready, same version          -> keep
    ready, another version       -> replace, one replica of a model at a time; or wait when the
                                    model's rollout was stopped by a failed replacement
    unhealthy                    -> restart (its /health failed failure_threshold times)
    exited (crashed or failed)   -> restart, or hold until its crash-loop backoff expires; a
                                    replacement that never became ready is rolled back instead
    found without a record       -> adopt it (same version) or replace it
    not wanted any more          -> stop (a worker whose new version does not fit keeps running)

`gardenctl.sequence` then orders the steps and writes down what each waits for.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gardenctl.argv import split_argv
from gardenctl.backoff import BackoffPolicy, failures_in_a_row, next_start_at
from gardenctl.observe import History, Observed, ObservedWorker, Rejection
from gardenctl.placement.model import Unplaced
from gardenctl.plan.model import Launch, Needs, Step, When
from gardenctl.sequence import chain_rollout, sequence
from gardenctl.spec.models import env_reference
from gardenctl.vocab import Blocker, Phase, StepKind
from gardenctl.workers import DesiredWorker


@dataclass(frozen=True)
class Circumstances:
    """The world beyond the file and the workers, as values."""

    now: float = 0.0  # wall-clock time
    env_names: frozenset[str] | None = None  # variables set where apply runs; None: unchecked
    busy_ports: Mapping[int, str] = field(default_factory=dict)  # port -> the other program
    # GPUs where another garden's worker loads or stops: (node, index) -> which worker, doing
    # what. Nothing of this garden starts or stops there meanwhile (docs/vllm.md).
    busy_gpus: Mapping[tuple[str, int], str] = field(default_factory=dict)
    history: History = field(default_factory=History)
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    # `standby: stop` workers a gateway wants running (a request came for them); the others
    # stay stopped
    demand: frozenset[str] = frozenset()


STOPPED_STANDBY = "stopped until a request for it reaches the gateway (standby: stop)"


@dataclass(frozen=True)
class ModelRollout:
    replicas: int
    max_unavailable: int = 1


def reconcile(desired: Sequence[DesiredWorker], observed: Observed,
              unplaced: Sequence[Unplaced] = (),
              rollouts: Mapping[str, ModelRollout] | None = None,
              world: Circumstances | None = None) -> tuple[Step, ...]:
    """Every step that brings ``observed`` (this garden's workers) to ``desired``, ordered."""
    world = world or Circumstances()
    rollouts = rollouts or {}
    decide = _Decider(observed, world, {w.model for w in desired})
    stopped = decide.stopped_rollouts(desired)
    steps: list[Step] = []
    for worker in sorted(desired, key=lambda w: (w.model, w.replica)):
        current = observed.get(worker.worker_id)
        steps += decide.unless_gpu_busy(decide.wanted(worker, current, stopped), current)
    wanted = {w.worker_id for w in desired}
    held_back = {u.worker_id for u in unplaced if u.kept_previous}
    models = {w.model for w in desired} | {u.model for u in unplaced}
    for current in observed.workers:
        if current.worker_id not in wanted:
            steps += decide.unless_gpu_busy(
                decide.unwanted(current, current.worker_id in held_back, models), current)
    steps = _pace_rollouts(steps, desired, observed, rollouts)
    return sequence(steps)


class _Decider:
    def __init__(self, observed: Observed, world: Circumstances, wanted_models: set[str]) -> None:
        self.observed = observed
        self.world = world
        self.running_models = {w.model for w in observed.workers if w.running}
        self.wanted_models = wanted_models

    def unless_gpu_busy(self, steps: list[Step], current: ObservedWorker | None) -> list[Step]:
        """The worker's steps, or one wait while a GPU they would start or stop something on
        is busy with another garden's load or stop."""
        busy = self.world.busy_gpus
        if not busy:
            return steps
        for step in steps:
            if not step.kind.acts or step.kind == StepKind.ADOPT:  # adopting moves no memory
                continue
            hit = sorted(key for key in step.gpu_keys if key in busy)
            if hit:
                node, index = hit[0]
                first = next(s for s in steps if s.kind.acts)
                return [dataclasses.replace(
                    _step(StepKind.WAIT, first.worker, current,
                          f"GPU {index} of {node} is busy ({busy[hit[0]]}); once it is free: "
                          f"{first.kind.value}, {first.cause}"), blocked_by=Blocker.GPU)]
        return steps

    # -- workers the garden wants ------------------------------------------------------------

    def wanted(self, worker: DesiredWorker, current: ObservedWorker | None,
               stopped: Mapping[str, str]) -> list[Step]:
        standby = worker.standby
        if standby is not None and standby.mode == "stop" \
                and worker.worker_id not in self.world.demand:
            return self._idle(worker, current)
        if current is None:
            return self._spawn(StepKind.START, worker, None, self._start_cause(worker), Launch())
        if current.in_flight:
            return [_step(StepKind.AWAIT, worker, current, f"{_doing(current)} (in progress)")]
        same = current.spec_hash == worker.spec_hash
        phase = current.phase
        # While a model's rollout is stopped, its replicas keep (and restart) the version they
        # run; only a new edit of the model moves them again.
        keeps = current.spec if not same and (
            current.rejected_for(worker) or worker.model in stopped) else None
        if phase == Phase.UNKNOWN:
            if same:
                return [_step(StepKind.ADOPT, worker, current, "found running with the same spec "
                              "but no record: adopting it")]
            return self._replace(worker, current, "found running with gardenctl's marker but no "
                                 "record, in another version: " + describe_change(current, worker))
        if phase == Phase.STARTING:
            if self._timed_out(current, worker):
                reason = f"not ready within its start timeout of {worker.start_timeout:g}s"
                if self._failed_replacement(current, worker):
                    return self._rollback(worker, current, reason)
                return self._restart(keeps or worker, current, f"not ready within its start "
                                     f"timeout of {worker.start_timeout:g}s", then=Phase.FAILED)
            if same or keeps is not None:
                return [_step(StepKind.AWAIT, keeps or worker, current,
                              f"still loading (started {_clock(current.started_at)})")]
            return self._replace(worker, current, describe_change(current, worker))
        if phase == Phase.READY:
            if same:
                return [_step(StepKind.KEEP, worker, current, "up to date")]
            if keeps is not None:
                return [dataclasses.replace(_step(StepKind.WAIT, keeps, current, stopped.get(
                    worker.model, "rollout stopped: this version was rolled back")),
                    blocked_by=Blocker.ROLLOUT)]
            return self._replace(worker, current, describe_change(current, worker))
        if phase in (Phase.UNHEALTHY, Phase.STOPPING):
            recorded = current.last_error or ""
            reason = ("an earlier stop of it was interrupted" if phase == Phase.STOPPING
                      else recorded if recorded.startswith("unhealthy")
                      else f"unhealthy: {current.health or 'its health checks fail'}")
            return self._restart(keeps or worker, current, reason, then=Phase.CRASHED)
        return self._after_exit(worker, current, keeps)

    def _after_exit(self, worker: DesiredWorker, current: ObservedWorker,
                    keeps: DesiredWorker | None) -> list[Step]:
        if self._failed_replacement(current, worker):
            return self._rollback(worker, current, _exit_detail(current))
        return self._restart(keeps or worker, current, _death(current))

    @staticmethod
    def _failed_replacement(current: ObservedWorker, worker: DesiredWorker) -> bool:
        """``current`` is the wanted version, started to replace a version that was ready, and
        it has not been ready: it is given up for that version."""
        return (current.previous is not None and not current.ever_ready
                and current.spec_hash == worker.spec_hash)

    def _rollback(self, worker: DesiredWorker, current: ObservedWorker,
                  reason: str) -> list[Step]:
        assert current.previous is not None
        rejection = Rejection(worker.spec_hash, reason, UNSTAMPED)
        return self._spawn(StepKind.ROLLBACK, current.previous, current,
                           f"its new version did not become ready ({reason}); starting the "
                           "previous version again", Launch(rejected=rejection),
                           ends=reason if current.running else "")

    def _restart(self, target: DesiredWorker, current: ObservedWorker, reason: str, *,
                 then: Phase | None = None) -> list[Step]:
        """Start ``target`` again in the place of ``current`` (dead, unhealthy or stuck),
        honouring the crash-loop backoff when it is the same version."""
        same = target.spec_hash == current.spec_hash
        now = self.world.now
        policy = self.world.backoff
        if not same:  # a new version starts with no failures behind it
            launch = Launch(rejected=None, replaces=_rollback_target(current, target))
            return self._spawn(StepKind.RESTART, target, current, f"{reason}; starting its new "
                               f"version ({describe_change(current, target)})", launch)
        failures = failures_in_a_row(current, policy, now)
        launch = Launch(restarts=current.restarts + 1, streak=failures, rejected=current.rejected,
                        replaces=_rollback_target(current, target))
        until = next_start_at(current, policy, now)
        ends = reason if current.running else ""
        if until is None:
            return self._spawn(StepKind.RESTART, target, current,
                               f"{reason}; starting it again", launch, then=then, ends=ends)
        held = _step(StepKind.HOLD, target, current,
                     f"{reason}; crash-looping ({failures} failures in a row): next start at "
                     f"{_clock(until)}", until=until, launch=launch)
        if current.running:
            stop = _step(StepKind.STOP, target, current, f"{reason}; stopping it until its next "
                         "start", then=then or Phase.CRASHED, ends=ends)
            return [stop, held]
        if current.pids:
            return [_leftovers(target, current), held]
        return [held]

    def _replace(self, worker: DesiredWorker, current: ObservedWorker, cause: str) -> list[Step]:
        """Replace the running version; a ready one is started again if the new version does
        not become ready (the conditional rollback step)."""
        if current.phase != Phase.READY:
            return self._spawn(StepKind.REPLACE, worker, current, cause,
                               Launch(replaces=_rollback_target(current, worker)))
        steps = self._spawn(StepKind.REPLACE, worker, current, cause,
                            Launch(replaces=current.spec))
        if steps[0].kind != StepKind.REPLACE:
            return steps
        rejection = Rejection(worker.spec_hash, "its replacement did not become ready",
                              UNSTAMPED)
        rollback = _step(StepKind.ROLLBACK, current.spec, current,
                         "only if the new version does not become ready: start the running "
                         "version again", launch=Launch(rejected=rejection))
        return [steps[0], dataclasses.replace(rollback, after=(Needs(steps[0].id, When.FAILED),))]

    def _spawn(self, kind: StepKind, worker: DesiredWorker, current: ObservedWorker | None,
               cause: str, launch: Launch, *, then: Phase | None = None,
               ends: str = "") -> list[Step]:
        """A step that starts ``worker``, or what stands in its way: an unset secret or a port
        another program holds (nothing is changed for the worker then)."""
        blocked, blocker = self._blocked(worker)
        if blocked is None:
            return [_step(kind, worker, current, cause, launch=launch, then=then, ends=ends)]
        if current is None or kind == StepKind.REPLACE:
            keeps = " (the running version stays)" if current is not None else ""
            return [dataclasses.replace(
                _step(StepKind.WAIT, worker, current, f"{blocked}; not started{keeps}"),
                blocked_by=blocker)]
        steps = []
        if current.running:
            steps.append(_step(StepKind.STOP, worker, current, cause, then=then or Phase.CRASHED,
                               ends=ends))
        elif current.pids:
            steps.append(_leftovers(worker, current))
        wait = _step(StepKind.WAIT, worker, current, f"{blocked}; not started again")
        return [*steps, dataclasses.replace(wait, blocked_by=blocker)]

    def _blocked(self, worker: DesiredWorker) -> tuple[str | None, Blocker | None]:
        """What keeps ``worker`` from starting, if anything, in words and in kind."""
        names = self.world.env_names
        if names is not None:
            missing = sorted({ref for _, value in worker.env
                              if (ref := env_reference(value)) is not None and ref not in names})
            if missing:
                return (f"environment variable{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)} not set where gardenctl runs"), Blocker.SECRET
        owner = self.world.busy_ports.get(worker.port)
        if owner is not None:
            return f"port {worker.port} is in use by {owner}", Blocker.PORT
        return None, None

    def _timed_out(self, current: ObservedWorker, worker: DesiredWorker) -> bool:
        started = current.started_at
        return (current.has_record and started is not None
                and self.world.now - started > worker.start_timeout)

    def _start_cause(self, worker: DesiredWorker) -> str:
        history = self.world.history
        if history.down_at is not None and worker.worker_id in history.down_workers and (
                history.applied_at is None or history.down_at >= history.applied_at):
            return f"not running: stopped by `gardenctl down` at {_clock(history.down_at)}"
        if worker.worker_id in history.applied_workers:
            return ("not running: no record of it (an earlier apply was interrupted before "
                    "starting it, or its record was removed)")
        if worker.model in self.running_models or any(
                w.startswith(f"{worker.garden}/{worker.model}/") for w in history.applied_workers):
            return f"replica {worker.replica} of {worker.model} added"
        return f"model {worker.model} added to the garden"

    def stopped_rollouts(self, desired: Sequence[DesiredWorker]) -> dict[str, str]:
        """Models whose rollout to the wanted version was stopped by a failed replacement
        (rolled back now, or earlier): model -> why, for the replicas not yet replaced."""
        stopped: dict[str, str] = {}
        for worker in sorted(desired, key=lambda w: (w.model, w.replica)):
            current = self.observed.get(worker.worker_id)
            if current is None or worker.model in stopped:
                continue
            if current.rejected_for(worker) and current.rejected is not None:
                why = current.rejected.reason
            elif (current.phase.dead and current.previous is not None and not current.ever_ready
                  and current.spec_hash == worker.spec_hash):
                why = _exit_detail(current)
            else:
                continue
            stopped[worker.model] = (
                f"rollout stopped: the new version of replica {worker.replica} did not become "
                f"ready ({why}); the running version stays. Change the model in the garden file "
                "to try again")
        return stopped

    # -- workers the garden does not want ----------------------------------------------------

    def _idle(self, worker: DesiredWorker, current: ObservedWorker | None) -> list[Step]:
        """A `standby: stop` worker no request needs: stopped (started again on demand)."""
        if current is None:
            return [_step(StepKind.KEEP, worker, None, STOPPED_STANDBY)]
        if current.in_flight:
            return [_step(StepKind.AWAIT, worker, current, f"{_doing(current)} (in progress)")]
        cause = ("idle: no request needs it (standby: stop); the gateway has it started again "
                 "on demand")
        if not current.running:
            cause += " (already exited; its record is removed)"
        return [_step(StepKind.STOP, worker, current, cause)]  # its place stays planned

    def unwanted(self, current: ObservedWorker, held_back: bool, models: set[str]) -> list[Step]:
        if current.in_flight:
            return [_step(StepKind.AWAIT, None, current, f"{_doing(current)} (in progress)")]
        if held_back and current.running:
            return [_step(StepKind.KEEP, None, current, "its new version does not fit (see "
                          "unplaced); the running version stays")]
        if not current.has_record:
            cause = "found running with gardenctl's marker but no record, and the garden does " \
                    "not want it"
        elif current.model in models:
            cause = f"replica {current.replica} of {current.model} no longer wanted"
        else:
            cause = f"model {current.model} removed from the garden"
        if not current.running:
            cause += " (already exited; its record is removed)"
        return [_step(StepKind.STOP, None, current, cause)]


def _pace_rollouts(steps: list[Step], desired: Sequence[DesiredWorker], observed: Observed,
                   rollouts: Mapping[str, ModelRollout]) -> list[Step]:
    """Replace ready replicas of a model at most `max_unavailable` at a time (counting the
    replicas already down), each after the previous one is ready; say what it means for the
    model's availability. A rollout that cannot proceed waits, naming the replicas down."""
    replacing = {s.model for s in steps if s.kind == StepKind.REPLACE}
    if not replacing:
        return steps
    workers: dict[str, list[DesiredWorker]] = {}
    for worker in desired:
        if worker.model in replacing:
            workers.setdefault(worker.model, []).append(worker)
    by_model: dict[str, list[Step]] = {}
    for step in steps:
        if step.model in replacing:
            by_model.setdefault(step.model, []).append(step)
    changed: dict[str, Step | None] = {}
    for model in sorted(replacing):
        wanted = workers.get(model, [])
        policy = rollouts.get(model, ModelRollout(len(wanted)))
        changed.update(chain_rollout(by_model[model], wanted, observed, policy.replicas,
                                     policy.max_unavailable))
    result = [changed.get(s.id, s) if s.id in changed else s for s in steps]
    return [s for s in result if s is not None]


# -- small pure helpers ---------------------------------------------------------------------

UNSTAMPED = 0.0  # a rollback's rejection is stamped with the time the rollback runs


def _rollback_target(current: ObservedWorker, target: DesiredWorker) -> DesiredWorker | None:
    """The last version of this replica that was ready, to start again if ``target`` does not
    become ready: the current run's own version once it has been ready, else the version the
    current run was itself replacing (carried until a run is ready). None when that is
    ``target`` itself (nothing to roll back to)."""
    last_ready = current.spec if current.ever_ready else current.previous
    if last_ready is None or last_ready.spec_hash == target.spec_hash:
        return None
    return last_ready

def _step(kind: StepKind, worker: DesiredWorker | None, current: ObservedWorker | None,
          cause: str, *, launch: Launch | None = None, then: Phase | None = None,
          until: float | None = None, ends: str = "") -> Step:
    target = worker if worker is not None else current
    assert target is not None
    return Step(kind=kind, worker_id=target.worker_id, model=target.model, cause=cause,
                worker=worker, previous=current, launch=launch, then=then, until=until,
                ends_because=ends)


def _leftovers(worker: DesiredWorker, current: ObservedWorker) -> Step:
    return _step(StepKind.STOP_LEFTOVERS, worker, current,
                 f"its run is over but {len(current.pids)} of its processes remain "
                 f"(pids {', '.join(map(str, current.pids))}); ending them", then=current.phase)


def _doing(current: ObservedWorker) -> str:
    return "being stopped" if current.phase == Phase.STOPPING else "being started"


def _clock(timestamp: float | None) -> str:
    if timestamp is None:
        return "at an unknown time"
    return time.strftime("%H:%M:%SZ", time.gmtime(timestamp))


def _exit_detail(current: ObservedWorker) -> str:
    code = current.exit_code
    if code is not None and code < 0:
        detail = f"killed by signal {-code}"
    elif code is not None:
        detail = f"exited with code {code}"
    else:
        detail = "exited"
    error = current.last_error
    if error and error != detail:
        detail = error if error.startswith(detail) or code is None else f"{detail}: {error}"
    return detail


def _death(current: ObservedWorker) -> str:
    return f"not running: {_exit_detail(current)}"


def describe_change(current: ObservedWorker, worker: DesiredWorker) -> str:
    """What differs between the running worker and the wanted one, flag by flag."""
    parts = []
    if (current.node, current.gpus) != (worker.node, worker.gpus):
        parts.append(f"moves from {_where(current.node, current.gpus)} to "
                     f"{_where(worker.node, worker.gpus)}")
    old_head, old_flags = split_argv(current.argv)
    new_head, new_flags = split_argv(worker.argv)
    if old_head != new_head:
        parts.append(f"command {' '.join(old_head)} -> {' '.join(new_head)}")
    for name in sorted(set(old_flags) | set(new_flags)):
        before, after = old_flags.get(name), new_flags.get(name)
        if before == after:
            continue
        label = name.lstrip("-")
        if before is None:
            parts.append(f"{label} added" + (f" ({after})" if after else ""))
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
    return "; ".join(parts) or "spec changed"


def _where(node: str, gpus: tuple[int, ...]) -> str:
    return f"{node} GPU {','.join(map(str, gpus))}"


__all__ = ["Circumstances", "ModelRollout", "describe_change", "reconcile"]
