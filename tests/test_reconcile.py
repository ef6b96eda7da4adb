"""Reconcile: every decision is a plan step with a cause; only what changed restarts."""

from __future__ import annotations

import dataclasses
import itertools

from builders import garden_text, observed_from, plan_for

from gardenctl.observe import History, Observed, ObservedWorker, Rejection
from gardenctl.plan.model import Needs, When
from gardenctl.reconcile import Circumstances
from gardenctl.vocab import Blocker, Cause, Phase, StepKind

TWO = """\
  - {name: qwen, model: Qwen/Qwen2.5-7B-Instruct, max_model_len: 8192}
  - {name: phi, model: microsoft/phi-2, max_model_len: 2048, priority: 5}
"""
NOW = 10_000.0


def kinds(plan):
    return {s.worker_id: s.kind for s in plan.steps if not s.conditional}


def step_of(plan, worker_id, kind=None):
    return next(s for s in plan.steps if s.worker_id == worker_id and not s.conditional
                and (kind is None or s.kind == kind))


def changed(observed: Observed, worker_id: str, **fields) -> Observed:
    return Observed(tuple(dataclasses.replace(w, **fields) if w.worker_id == worker_id else w
                          for w in observed.workers))


def plan_at(text, observed=None, **world):
    return plan_for(garden_text(text), observed, world=Circumstances(now=NOW, **world))


# -- what is kept, started, replaced and stopped ---------------------------------------------

def test_first_plan_starts_every_worker_with_a_cause():
    plan = plan_for(garden_text(TWO))
    assert kinds(plan) == {"lab/qwen/0": StepKind.START, "lab/phi/0": StepKind.START}
    assert all("added to the garden" in s.cause for s in plan.steps)


def test_nothing_changes_when_the_garden_is_applied():
    first = plan_for(garden_text(TWO))
    again = plan_for(garden_text(TWO), observed_from(first))
    assert set(kinds(again).values()) == {StepKind.KEEP}
    assert not again.has_changes and again.converged


def test_editing_one_model_replaces_only_that_worker_and_says_what_changed():
    first = plan_for(garden_text(TWO))
    edited = TWO.replace("max_model_len: 8192", "max_model_len: 16384")
    plan = plan_for(garden_text(edited), observed_from(first))
    assert kinds(plan) == {"lab/qwen/0": StepKind.REPLACE, "lab/phi/0": StepKind.KEEP}
    assert "max-model-len 8192 -> 16384" in step_of(plan, "lab/qwen/0").cause


def test_cosmetic_edits_restart_nothing():
    first = plan_for(garden_text(TWO))
    edited = "# a comment\n" + TWO.replace("priority: 5", "priority: 7, start_timeout: 1h")
    plan = plan_for(garden_text(edited), observed_from(first))
    assert set(kinds(plan).values()) == {StepKind.KEEP}


def test_adding_a_model_starts_it_and_leaves_others_alone():
    first = plan_for(garden_text(TWO))
    grown = TWO + "  - {name: small, model: Qwen/Qwen3-0.6B, max_model_len: 4096}\n"
    plan = plan_for(garden_text(grown), observed_from(first))
    assert kinds(plan) == {"lab/qwen/0": StepKind.KEEP, "lab/phi/0": StepKind.KEEP,
                           "lab/small/0": StepKind.START}


def test_removing_a_model_stops_only_it():
    first = plan_for(garden_text(TWO))
    plan = plan_for(garden_text(TWO.splitlines(keepends=True)[1]), observed_from(first))
    assert kinds(plan) == {"lab/qwen/0": StepKind.STOP, "lab/phi/0": StepKind.KEEP}
    assert "removed from the garden" in step_of(plan, "lab/qwen/0").cause


def test_more_replicas_start_new_ones_only_and_keep_ports_stable():
    first = plan_for(garden_text(TWO))
    ports = {s.worker_id: s.port for s in first.steps}
    scaled = TWO.replace("priority: 5", "priority: 5, replicas: 3")
    plan = plan_for(garden_text(scaled), observed_from(first))
    assert kinds(plan) == {"lab/qwen/0": StepKind.KEEP, "lab/phi/0": StepKind.KEEP,
                           "lab/phi/1": StepKind.START, "lab/phi/2": StepKind.START}
    assert "replica 1 of phi added" in step_of(plan, "lab/phi/1").cause
    assert all(s.port == ports[s.worker_id] for s in plan.steps if s.kind == StepKind.KEEP)
    assert len({s.port for s in plan.steps}) == 4


def test_fewer_replicas_stop_the_highest_replicas():
    three = TWO.replace("priority: 5", "priority: 5, replicas: 3")
    first = plan_for(garden_text(three))
    plan = plan_for(garden_text(TWO), observed_from(first))
    assert kinds(plan)["lab/phi/1"] == kinds(plan)["lab/phi/2"] == StepKind.STOP
    assert "no longer wanted" in step_of(plan, "lab/phi/2").cause


def test_edit_that_no_longer_fits_keeps_the_running_version():
    first = plan_for(garden_text(TWO), budgets={"qwen": 4})
    plan = plan_for(garden_text(TWO.replace("8192", "9000")), observed_from(first),
                    budgets={"qwen": 60})
    step = step_of(plan, "lab/qwen/0")
    assert step.kind == StepKind.KEEP and "does not fit" in step.cause
    assert plan.unplaced[0].kept_previous


def test_workers_of_other_gardens_are_left_alone():
    first = plan_for(garden_text(TWO))
    foreign = Observed(tuple(
        dataclasses.replace(w, spec=dataclasses.replace(
            w.spec, garden="other", worker_id="other" + w.worker_id[3:]))
        for w in observed_from(first).workers))
    plan = plan_for(garden_text(TWO), foreign)
    assert set(kinds(plan)) == {"lab/qwen/0", "lab/phi/0"}


def test_environment_change_names_the_variable_but_never_its_value():
    first = plan_for(garden_text(TWO))
    edited = TWO.replace("priority: 5}", "priority: 5, env: {HF_HOME: /secret-looking/path}}")
    plan = plan_for(garden_text(edited), observed_from(first))
    assert step_of(plan, "lab/phi/0").cause == "env HF_HOME added"


# -- why a worker is missing -----------------------------------------------------------------

def test_a_worker_stopped_by_down_is_not_called_new():
    history = History(applied_at=NOW - 100, applied_workers=frozenset({"lab/qwen/0"}),
                      down_at=NOW - 50, down_workers=frozenset({"lab/qwen/0"}))
    plan = plan_at(TWO, history=history)
    assert step_of(plan, "lab/qwen/0").cause.startswith("not running: stopped by `gardenctl "
                                                        "down` at ")
    assert step_of(plan, "lab/phi/0").cause == "model phi added to the garden"


def test_a_worker_an_interrupted_apply_never_started_is_not_called_new():
    history = History(applied_at=NOW - 100, applied_workers=frozenset({"lab/qwen/0"}))
    plan = plan_at(TWO, history=history)
    assert "an earlier apply was interrupted" in step_of(plan, "lab/qwen/0").cause


# -- what blocks a start ---------------------------------------------------------------------

def test_an_unset_secret_is_a_wait_step_and_a_warning_not_a_start():
    secret = TWO.replace("priority: 5}", "priority: 5, env: {HF_TOKEN: '${HF_TOKEN}'}}")
    plan = plan_at(secret, env_names=frozenset({"PATH"}))
    step = step_of(plan, "lab/phi/0")
    assert step.kind == StepKind.WAIT and "HF_TOKEN not set" in step.cause
    assert any("HF_TOKEN not set" in w for w in plan.warnings)
    assert kinds(plan)["lab/qwen/0"] == StepKind.START
    assert plan_at(secret, env_names=frozenset({"HF_TOKEN"})).steps[0].kind == StepKind.START


def test_a_replacement_whose_secret_is_unset_leaves_the_running_version_alone():
    first = plan_for(garden_text(TWO))
    secret = TWO.replace("priority: 5}", "priority: 5, env: {HF_TOKEN: '${HF_TOKEN}'}}")
    plan = plan_at(secret, observed_from(first), env_names=frozenset())
    step = step_of(plan, "lab/phi/0")
    assert step.kind == StepKind.WAIT and "the running version stays" in step.cause
    assert not any(s.kind.acts for s in plan.steps if s.worker_id == "lab/phi/0")


def test_an_explicit_port_another_program_holds_is_a_wait_step():
    pinned = TWO.replace("priority: 5}", "priority: 5, port: 9100}")
    plan = plan_at(pinned, busy_ports={9100: "pid 42 (nginx)"})
    step = step_of(plan, "lab/phi/0")
    assert (step.kind, step.cause) == (StepKind.WAIT, "port 9100 is in use by pid 42 (nginx); "
                                                      "not started")


# -- crashes, backoff, timeouts, liveness ----------------------------------------------------

def crashed(first, worker_id="lab/qwen/0", **fields):
    values = {"phase": Phase.CRASHED, "exit_code": 1, "last_error": "CUDA out of memory",
              "cause": Cause.OUT_OF_MEMORY, "exited_at": NOW - 1, "ready_at": NOW - 60}
    return changed(observed_from(first), worker_id, **{**values, **fields})


def test_a_crashed_worker_is_restarted_at_once_with_its_exit_reason():
    first = plan_for(garden_text(TWO))
    plan = plan_at(TWO, crashed(first))
    step = step_of(plan, "lab/qwen/0")
    assert step.kind == StepKind.RESTART and "CUDA out of memory" in step.cause
    assert (step.launch.restarts, step.launch.streak) == (1, 1)


def test_a_crash_loop_is_held_until_its_backoff_expires_and_the_plan_says_until_when():
    first = plan_for(garden_text(TWO))
    plan = plan_at(TWO, crashed(first, streak=2, restarts=2))
    step = step_of(plan, "lab/qwen/0")
    assert step.kind == StepKind.HOLD and step.until == NOW - 1 + 20  # third failure: 20 s
    assert "3 failures in a row" in step.cause and "next start at" in step.cause
    later = plan_for(garden_text(TWO), crashed(first, streak=2, restarts=2),
                     world=Circumstances(now=NOW + 20))
    assert step_of(later, "lab/qwen/0").kind == StepKind.RESTART


def test_leftover_processes_of_a_held_worker_are_stopped_now():
    first = plan_for(garden_text(TWO))
    plan = plan_at(TWO, crashed(first, streak=3, pids=(4242,)))
    assert [s.kind for s in plan.steps if s.worker_id == "lab/qwen/0"] == [
        StepKind.STOP_LEFTOVERS, StepKind.HOLD]


def test_a_worker_past_its_start_timeout_is_restarted_and_counted_as_a_failure():
    first = plan_for(garden_text(TWO.replace("8192}", "8192, start_timeout: 60s}")))
    loading = changed(observed_from(first, phase="starting"), "lab/qwen/0",
                      started_at=NOW - 61)
    plan = plan_at(TWO.replace("8192}", "8192, start_timeout: 60s}"), loading)
    step = step_of(plan, "lab/qwen/0")
    assert step.kind == StepKind.RESTART and "start timeout of 60s" in step.cause
    still = changed(loading, "lab/qwen/0", started_at=NOW - 30)
    assert step_of(plan_at(TWO.replace("8192}", "8192, start_timeout: 60s}"), still),
                   "lab/qwen/0").kind == StepKind.AWAIT


def test_an_unhealthy_worker_is_restarted():
    first = plan_for(garden_text(TWO))
    sick = changed(observed_from(first), "lab/qwen/0", phase=Phase.UNHEALTHY,
                   health="/health answered 503 (3 probes in a row)")
    step = step_of(plan_at(TWO, sick), "lab/qwen/0")
    assert step.kind == StepKind.RESTART
    assert step.cause.startswith("unhealthy: /health answered 503")


def test_a_worker_being_acted_on_is_awaited_not_acted_on_again():
    first = plan_for(garden_text(TWO))
    busy = changed(observed_from(first), "lab/qwen/0", phase=Phase.STOPPING, in_flight=True)
    edited = TWO.replace("max_model_len: 8192", "max_model_len: 4096")
    step = step_of(plan_at(edited, busy), "lab/qwen/0")
    assert (step.kind, step.cause) == (StepKind.AWAIT, "being stopped (in progress)")


# -- rollouts --------------------------------------------------------------------------------

THREE = "  - {name: m, model: Qwen/Qwen3-0.6B, max_model_len: 4096, replicas: 3}\n"


def test_replicas_are_replaced_one_at_a_time_each_after_the_previous_is_ready():
    first = plan_for(garden_text(THREE))
    plan = plan_for(garden_text(THREE.replace("4096", "2048")), observed_from(first))
    replaces = [s for s in plan.steps if s.kind == StepKind.REPLACE]
    assert [s.worker_id for s in replaces] == ["lab/m/0", "lab/m/1", "lab/m/2"]
    assert Needs("replace:lab/m/0", When.DONE) in replaces[1].after
    assert Needs("replace:lab/m/1", When.DONE) in replaces[2].after
    assert "one of 3 replicas at a time" in replaces[0].notes


def test_max_unavailable_two_replaces_two_replicas_at_once():
    wide = THREE.replace("replicas: 3", "replicas: 3, rollout: {max_unavailable: 2}")
    first = plan_for(garden_text(wide))
    plan = plan_for(garden_text(wide.replace("4096", "2048")), observed_from(first))
    replaces = {s.worker_id: s for s in plan.steps if s.kind == StepKind.REPLACE}
    rollout_needs = {w: {n.step_id for n in s.after if n.when == When.DONE
                         and n.step_id.startswith("replace:")} for w, s in replaces.items()}
    assert rollout_needs == {"lab/m/0": set(), "lab/m/1": set(),
                             "lab/m/2": {"replace:lab/m/0"}}


def test_a_replacement_comes_with_a_rollback_that_runs_only_if_it_fails():
    first = plan_for(garden_text(TWO))
    plan = plan_for(garden_text(TWO.replace("8192", "4096")), observed_from(first))
    rollback = next(s for s in plan.steps if s.kind == StepKind.ROLLBACK)
    assert rollback.conditional and rollback.after == (Needs("replace:lab/qwen/0", When.FAILED),)
    assert rollback.worker == observed_from(first).get("lab/qwen/0").spec  # the running one
    assert "unavailable until its new version is ready (1 replica)" in \
        step_of(plan, "lab/qwen/0").notes[0]


def test_a_replacement_that_failed_is_rolled_back_and_the_rollout_stops():
    first = plan_for(garden_text(THREE))
    edited = THREE.replace("4096", "2048")
    new = plan_for(garden_text(edited), observed_from(first))
    old_spec = observed_from(first).get("lab/m/0").spec
    new_spec = step_of(new, "lab/m/0").worker
    failed = changed(observed_from(first), "lab/m/0", spec=new_spec, phase=Phase.FAILED,
                     previous=old_spec, ready_at=None, exit_code=1, exited_at=NOW - 1,
                     last_error="CUDA out of memory")
    plan = plan_at(edited, failed)
    rollback = step_of(plan, "lab/m/0")
    assert rollback.kind == StepKind.ROLLBACK and rollback.worker == old_spec
    assert rollback.launch.rejected.spec_hash == new_spec.spec_hash
    assert "CUDA out of memory" in rollback.cause
    for other in ("lab/m/1", "lab/m/2"):  # the rollout stops: no other replica is touched
        step = step_of(plan, other)
        assert step.kind == StepKind.WAIT and step.cause.startswith("rollout stopped")


def test_a_replacement_stuck_loading_past_its_timeout_is_rolled_back():
    first = plan_for(garden_text(THREE))
    edited = THREE.replace("4096", "2048")
    old_spec = observed_from(first).get("lab/m/0").spec
    new_spec = step_of(plan_for(garden_text(edited), observed_from(first)), "lab/m/0").worker
    stuck = changed(observed_from(first), "lab/m/0", spec=new_spec, phase=Phase.STARTING,
                    previous=old_spec, ready_at=None, started_at=NOW - 3600)
    plan = plan_at(edited, stuck)
    rollback = step_of(plan, "lab/m/0")
    assert rollback.kind == StepKind.ROLLBACK and rollback.worker == old_spec
    assert "not ready within its start timeout" in rollback.cause
    assert rollback.launch.rejected.spec_hash == new_spec.spec_hash
    assert rollback.launch.rejected.at == 0.0  # stamped when it runs: a saved plan matches


def test_the_last_ready_version_is_carried_through_every_start_until_one_is_ready():
    """v1 ready; v2 replaces it and crashes before ready... whatever the next edit is, v1 stays
    what a failure rolls back to until some version has been ready."""
    first = plan_for(garden_text(THREE))
    v1 = observed_from(first).get("lab/m/0").spec
    v2_text, v3_text = THREE.replace("4096", "2048"), THREE.replace("4096", "3072")
    v2 = step_of(plan_for(garden_text(v2_text), observed_from(first)), "lab/m/0").worker
    loading_v2 = changed(observed_from(first), "lab/m/0", spec=v2, phase=Phase.STARTING,
                         previous=v1, ready_at=None, started_at=NOW - 1)
    replace = step_of(plan_at(v3_text, loading_v2), "lab/m/0")  # edited again while v2 loads
    assert replace.kind == StepKind.REPLACE and replace.launch.replaces == v1
    stopping_v2 = changed(loading_v2, "lab/m/0", phase=Phase.STOPPING)
    restart = step_of(plan_at(v3_text, stopping_v2), "lab/m/0")
    assert restart.kind == StepKind.RESTART and restart.launch.replaces == v1
    crashed_v1 = changed(observed_from(first), "lab/m/0", phase=Phase.CRASHED,
                         exited_at=NOW - 1)  # v1 had been ready: it is the version to go back to
    restart = step_of(plan_at(v2_text, crashed_v1), "lab/m/0")
    assert restart.kind == StepKind.RESTART and restart.launch.replaces == v1


def test_nothing_starts_or_stops_on_a_gpu_where_another_garden_loads():
    first = plan_for(garden_text(TWO))
    qwen = observed_from(first).get("lab/qwen/0")
    busy = {(qwen.node, qwen.gpus[0]): "other/big/0 is loading there"}
    plan = plan_at(TWO.replace("8192", "4096"), observed_from(first), busy_gpus=busy)
    wait = step_of(plan, "lab/qwen/0")
    assert (wait.kind, wait.blocked_by) == (StepKind.WAIT, Blocker.GPU)  # the running one stays
    assert wait.cause.startswith(f"GPU {qwen.gpus[0]} of {qwen.node} is busy (other/big/0 is "
                                 "loading there); once it is free: replace,")
    assert not any(s.kind == StepKind.ROLLBACK for s in plan.steps)
    removed = plan_at(TWO.splitlines(keepends=True)[1], observed_from(first), busy_gpus=busy)
    assert step_of(removed, "lab/qwen/0").kind == StepKind.WAIT  # nor is a removed one


def test_after_a_rollback_the_rejected_version_is_not_tried_again_until_the_file_changes():
    first = plan_for(garden_text(THREE))
    edited = THREE.replace("4096", "2048")
    new_spec = step_of(plan_for(garden_text(edited), observed_from(first)), "lab/m/0").worker
    rolled_back = changed(observed_from(first), "lab/m/0",
                          rejected=Rejection(new_spec.spec_hash, "CUDA out of memory", NOW))
    plan = plan_at(edited, rolled_back)
    assert {s.kind for s in plan.steps} == {StepKind.WAIT}
    assert not plan.has_changes and not plan.converged
    again = plan_at(THREE.replace("4096", "3072"), rolled_back)  # another edit: try it
    assert [s.kind for s in again.steps if not s.conditional].count(StepKind.REPLACE) == 3


def test_a_rollout_waits_while_another_replica_is_down_with_nothing_to_bring_it_back():
    pinned = THREE.replace("replicas: 3", "replicas: 3, port: 9100")
    first = plan_for(garden_text(pinned))
    gone = Observed(tuple(w for w in observed_from(first).workers if w.worker_id != "lab/m/2"))
    plan = plan_at(pinned.replace("4096", "2048"), gone, busy_ports={9102: "pid 7 (nc)"})
    assert kinds(plan) == {"lab/m/0": StepKind.WAIT, "lab/m/1": StepKind.WAIT,
                           "lab/m/2": StepKind.WAIT}
    assert "rollout waits: replica(s) 2 of m not ready" in step_of(plan, "lab/m/0").cause
    assert not any(s.kind == StepKind.ROLLBACK for s in plan.steps)


def test_a_rollout_waits_for_a_replica_that_is_coming_back():
    first = plan_for(garden_text(THREE))
    dead = changed(observed_from(first), "lab/m/2", phase=Phase.CRASHED, exited_at=NOW - 1,
                   ready_at=NOW - 100)
    plan = plan_at(THREE.replace("4096", "2048"), dead)
    assert kinds(plan) == {"lab/m/0": StepKind.REPLACE, "lab/m/1": StepKind.REPLACE,
                           "lab/m/2": StepKind.RESTART}  # in its new version at once
    assert Needs("restart:lab/m/2", When.DONE) in step_of(plan, "lab/m/0").after


# -- the order of steps on a GPU -------------------------------------------------------------

def test_stops_come_before_starts_and_starts_on_one_gpu_follow_each_other():
    first = plan_for(garden_text(TWO))
    swapped = TWO.replace("name: qwen", "name: qwen2") + \
        "  - {name: small, model: Qwen/Qwen3-0.6B, max_model_len: 4096}\n"
    plan = plan_for(garden_text(swapped), observed_from(first))
    order = [s.kind for s in plan.steps]
    assert order.index(StepKind.STOP) < order.index(StepKind.START)
    starts = [s for s in plan.steps if s.kind == StepKind.START]
    stop = next(s for s in plan.steps if s.kind == StepKind.STOP)
    for start in starts:
        if start.gpus == stop.gpus:
            assert Needs(stop.id, When.DONE) in start.after
    same_gpu = [s for s in starts if s.gpus == starts[0].gpus]
    for before, after in itertools.pairwise(same_gpu):
        assert Needs(before.id, When.FINISHED) in after.after


def test_nothing_stops_on_a_gpu_while_a_worker_loads_there():
    first = plan_for(garden_text(TWO))
    loading = changed(observed_from(first, phase="starting"), "lab/phi/0", started_at=NOW)
    plan = plan_at(TWO.splitlines(keepends=True)[1], loading)  # qwen removed; phi loading
    stop = step_of(plan, "lab/qwen/0")
    if stop.gpus == step_of(plan, "lab/phi/0").gpus:
        assert Needs("await:lab/phi/0", When.FINISHED) in stop.after


def test_the_same_input_gives_the_same_steps():
    first = plan_for(garden_text(THREE))
    edited = THREE.replace("4096", "2048")
    one = plan_for(garden_text(edited), observed_from(first))
    two = plan_for(garden_text(edited), observed_from(first))
    assert one.steps == two.steps


def test_orphan_with_the_same_spec_is_adopted():
    first = plan_for(garden_text(TWO))
    orphan = changed(observed_from(first), "lab/qwen/0", phase=Phase.UNKNOWN, has_record=False)
    step = step_of(plan_for(garden_text(TWO), orphan), "lab/qwen/0")
    assert step.kind == StepKind.ADOPT and "adopting it" in step.cause


def test_observed_worker_round_trips_through_json():
    first = plan_for(garden_text(TWO))
    worker = crashed(first).get("lab/qwen/0")
    assert ObservedWorker.from_json(worker.to_json()) == worker
