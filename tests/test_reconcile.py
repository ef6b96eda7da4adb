"""Reconcile: only what changed restarts; causes say why in plain words."""

from __future__ import annotations

from builders import garden_text, observed_from, plan_for

from gardenctl.observe import CRASHED, Observed
from gardenctl.plan import KEEP, REPLACE, START, STOP

TWO = """\
  - {name: qwen, model: Qwen/Qwen2.5-7B-Instruct, max_model_len: 8192}
  - {name: phi, model: microsoft/phi-2, max_model_len: 2048, priority: 5}
"""


def actions(plan):
    return {a.worker_id: a.action for a in plan.actions}


def test_first_plan_starts_every_worker_with_a_cause():
    plan = plan_for(garden_text(TWO))
    assert actions(plan) == {"lab/qwen/0": START, "lab/phi/0": START}
    assert all("added to the garden" in a.cause for a in plan.actions)


def test_nothing_changes_when_the_garden_is_applied():
    first = plan_for(garden_text(TWO))
    again = plan_for(garden_text(TWO), observed_from(first))
    assert set(actions(again).values()) == {KEEP}
    assert not again.has_changes


def test_editing_one_model_replaces_only_that_worker_and_says_what_changed():
    first = plan_for(garden_text(TWO))
    edited = TWO.replace("max_model_len: 8192", "max_model_len: 16384")
    plan = plan_for(garden_text(edited), observed_from(first))
    assert actions(plan) == {"lab/qwen/0": REPLACE, "lab/phi/0": KEEP}
    replace = next(a for a in plan.actions if a.action == REPLACE)
    assert "max-model-len 8192 -> 16384" in replace.cause


def test_cosmetic_edits_restart_nothing():
    first = plan_for(garden_text(TWO))
    edited = "# a comment\n" + TWO.replace("priority: 5", "priority: 7")
    plan = plan_for(garden_text(edited), observed_from(first))
    assert set(actions(plan).values()) == {KEEP}


def test_adding_a_model_starts_it_and_leaves_others_alone():
    first = plan_for(garden_text(TWO))
    grown = TWO + "  - {name: small, model: Qwen/Qwen3-0.6B, max_model_len: 4096}\n"
    plan = plan_for(garden_text(grown), observed_from(first))
    assert actions(plan) == {"lab/qwen/0": KEEP, "lab/phi/0": KEEP, "lab/small/0": START}


def test_removing_a_model_stops_only_it():
    first = plan_for(garden_text(TWO))
    plan = plan_for(garden_text(TWO.splitlines(keepends=True)[1]), observed_from(first))
    assert actions(plan) == {"lab/qwen/0": STOP, "lab/phi/0": KEEP}
    assert "removed from the garden" in next(a for a in plan.actions if a.action == STOP).cause


def test_more_replicas_start_new_ones_only_and_keep_ports_stable():
    first = plan_for(garden_text(TWO))
    ports = {a.worker_id: a.port for a in first.actions}
    scaled = TWO.replace("priority: 5", "priority: 5, replicas: 3")
    plan = plan_for(garden_text(scaled), observed_from(first))
    assert actions(plan) == {"lab/qwen/0": KEEP, "lab/phi/0": KEEP, "lab/phi/1": START,
                             "lab/phi/2": START}
    assert all(a.port == ports[a.worker_id] for a in plan.actions if a.action == KEEP)
    assert len({a.port for a in plan.actions}) == 4


def test_fewer_replicas_stop_the_highest_replicas():
    three = TWO.replace("priority: 5", "priority: 5, replicas: 3")
    first = plan_for(garden_text(three))
    plan = plan_for(garden_text(TWO), observed_from(first))
    assert actions(plan)["lab/phi/1"] == STOP and actions(plan)["lab/phi/2"] == STOP
    assert "no longer wanted" in next(a for a in plan.actions if a.worker_id == "lab/phi/2").cause


def test_crashed_worker_is_started_again_with_its_exit_reason():
    first = plan_for(garden_text(TWO))
    observed = observed_from(first)
    crashed = tuple(w if w.worker_id != "lab/qwen/0" else
                    w.__class__(**{**w.__dict__, "phase": CRASHED, "exit_code": 1,
                                   "last_error": "CUDA out of memory"})
                    for w in observed.workers)
    plan = plan_for(garden_text(TWO), Observed(crashed))
    action = next(a for a in plan.actions if a.worker_id == "lab/qwen/0")
    assert action.action == START and "CUDA out of memory" in action.cause


def test_edit_that_no_longer_fits_keeps_the_running_version():
    first = plan_for(garden_text(TWO), budgets={"qwen": 4})
    plan = plan_for(garden_text(TWO.replace("8192", "9000")), observed_from(first),
                    budgets={"qwen": 60})
    action = next(a for a in plan.actions if a.worker_id == "lab/qwen/0")
    assert action.action == KEEP and "does not fit" in action.cause
    assert plan.unplaced[0].kept_previous


def test_workers_of_other_gardens_are_left_alone():
    first = plan_for(garden_text(TWO))
    other = observed_from(first)
    foreign = Observed(tuple(w.__class__(**{**w.__dict__, "garden": "other",
                                            "worker_id": "other" + w.worker_id[3:]})
                             for w in other.workers))
    plan = plan_for(garden_text(TWO), foreign)
    assert set(actions(plan)) == {"lab/qwen/0", "lab/phi/0"}


def test_stops_come_before_starts():
    first = plan_for(garden_text(TWO))
    swapped = TWO.replace("name: qwen", "name: qwen2")
    plan = plan_for(garden_text(swapped), observed_from(first))
    kinds = [a.action for a in plan.actions]
    assert kinds.index(STOP) < kinds.index(START)


def test_environment_change_names_the_variable_but_never_its_value():
    first = plan_for(garden_text(TWO))
    edited = TWO.replace("priority: 5}", "priority: 5, env: {HF_HOME: /secret-looking/path}}")
    plan = plan_for(garden_text(edited), observed_from(first))
    replace = next(a for a in plan.actions if a.action == REPLACE)
    assert replace.cause == "env HF_HOME added"
