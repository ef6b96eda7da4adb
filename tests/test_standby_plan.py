"""Standby models in the plan: booked asleep plus one wake slot per GPU, host RAM for level 1,
sleep mode on their command line, and the same booking in the ledger, the JSON and status."""

from __future__ import annotations

import dataclasses
import json

import pytest
from builders import GiB, garden_text, inventory, plan_for, policy, request

from gardenctl.errors import SpecError
from gardenctl.estimate.types import Item
from gardenctl.inventory.model import Inventory, Node
from gardenctl.placement import Holding, place
from gardenctl.placement.model import HOST_MEMORY
from gardenctl.placement.standby import booked_bytes
from gardenctl.plan.document import plan_to_json
from gardenctl.spec import parse_garden


def standby(worker_id: str, weights_gib: float, asleep_gib: float = 1.0, *, level: int = 1,
            **kwargs):
    """A standby request: ``weights_gib`` of weights, ``asleep_gib`` left on the GPU asleep
    (its CUDA context 0.5 GiB plus the rest as CUDA-graph pool, like vLLM's sleep mode)."""
    base = request(worker_id, weights_gib, **kwargs)
    graphs = int((asleep_gib - 0.5) * GiB)
    sized = dataclasses.replace(base.estimate, cuda_graph=Item(graphs, "test"),
                                weights=Item(base.estimate.weights.bytes - graphs, "test"))
    return dataclasses.replace(base, estimate=sized, standby_level=level)


def with_host(inv: Inventory, host_gib: float) -> Inventory:
    return dataclasses.replace(inv, nodes=tuple(
        Node(n.name, n.gpus, int(host_gib * GiB)) for n in inv.nodes))


def row(placement, node="node-a", index=0):
    return next(r for r in placement.ledgers if (r.node, r.index) == (node, index))


def test_standby_models_that_do_not_fit_awake_together_share_one_gpu():
    # three 20 GiB models on one 40 GiB GPU: always awake, only one fits after the first...
    awake = place([request(f"g/m{i}/0", 20) for i in range(3)], inventory(("node-a", 1, 40)),
                  policy(min_available_gpu_fraction=0))
    assert len(awake.assignments) == 1
    # ...standby, all three: each booked asleep (1 GiB) plus one wake slot (the largest
    # awake - asleep), so any one of them can be woken while the others sleep
    placement = place([standby(f"g/m{i}/0", 20) for i in range(3)],
                      inventory(("node-a", 1, 40)), policy(min_available_gpu_fraction=0))
    assert {a.worker_id for a in placement.assignments} == {"g/m0/0", "g/m1/0", "g/m2/0"}
    ledger = row(placement)
    awake_claim = placement.assignments[0].claim_bytes
    assert ledger.wake_slot_bytes == awake_claim - GiB
    assert ledger.claimed_after_bytes == 3 * GiB + ledger.wake_slot_bytes
    assert ledger.free_after_bytes >= 0
    assert all(a.asleep_bytes == GiB for a in placement.assignments)


def test_the_wake_slot_is_the_largest_wake_up_and_never_counted_twice():
    placement = place([standby("g/big/0", 30, 2), standby("g/small/0", 8, 1),
                       request("g/always/0", 4)],
                      inventory(("node-a", 1, 48)), policy(min_available_gpu_fraction=0))
    ledger = row(placement)
    claims = {a.worker_id: a.claim_bytes for a in placement.assignments}
    assert ledger.wake_slot_bytes == claims["g/big/0"] - 2 * GiB
    assert ledger.claimed_after_bytes == (claims["g/always/0"] + 3 * GiB
                                          + claims["g/big/0"] - 2 * GiB)
    assert booked_bytes([(claims["g/always/0"], None), (claims["g/big/0"], 2 * GiB),
                         (claims["g/small/0"], GiB)]) == ledger.claimed_after_bytes


def test_a_standby_model_too_big_to_wake_on_any_gpu_is_unplaced_with_numbers():
    placement = place([request("g/always/0", 30), standby("g/big/0", 16)],
                      inventory(("node-a", 1, 40)), policy(min_available_gpu_fraction=0))
    assert [u.worker_id for u in placement.unplaced] == ["g/big/0"]
    message = placement.unplaced[0].reasons[0].message
    assert "asleep" in message and "more wake slot" in message and "free" in message


def test_standby_models_gather_where_a_wake_slot_already_exists():
    placement = place([standby("g/a/0", 20), standby("g/b/0", 10), standby("g/c/0", 10)],
                      inventory(("node-a", 2, 40)), policy(min_available_gpu_fraction=0))
    assert {a.gpus for a in placement.assignments} == {(0,)}  # one GPU, the other stays empty


def test_level_one_weights_must_fit_the_nodes_share_of_host_ram():
    inv = with_host(inventory(("node-a", 1, 80)), host_gib=64)  # standby share: 32 GiB
    placement = place([standby("g/a/0", 20), standby("g/b/0", 20)], inv,
                      policy(min_available_gpu_fraction=0))
    assert [u.worker_id for u in placement.unplaced] == ["g/b/0"]
    reason = placement.unplaced[0].reasons[0]
    assert reason.code == HOST_MEMORY and "host RAM" in reason.message
    # level 2 drops the weights while asleep: no host RAM needed
    placement = place([standby("g/a/0", 20), standby("g/b/0", 20, level=2)], inv,
                      policy(min_available_gpu_fraction=0))
    assert not placement.unplaced
    # a larger share takes both at level 1
    placement = place([standby("g/a/0", 20), standby("g/b/0", 20)], inv,
                      policy(min_available_gpu_fraction=0, standby_host_fraction=0.8))
    assert not placement.unplaced


def test_running_standby_workers_keep_their_place_and_book_asleep():
    first = place([standby("g/a/0", 20), standby("g/b/0", 20)], inventory(("node-a", 1, 40)),
                  policy(min_available_gpu_fraction=0))
    holdings = [Holding(a.worker_id, a.model, a.node, a.gpus, a.utilization, a.claim_bytes,
                        "s", asleep_bytes=a.asleep_bytes) for a in first.assignments]
    again = place([standby("g/a/0", 20), standby("g/b/0", 20), standby("g/c/0", 20)],
                  inventory(("node-a", 1, 40)), policy(min_available_gpu_fraction=0), holdings)
    kept = {a.worker_id for a in again.assignments if a.kept}
    assert kept == {"g/a/0", "g/b/0"} and again.assignment("g/c/0") is not None
    assert row(again).claimed_before_bytes == row(first).claimed_after_bytes


STANDBY_GARDEN = """\
  - {name: a, model: org/a, standby: sleep}
  - {name: b, model: org/b, standby: {mode: sleep, level: 2, idle_timeout: 2m}}
  - {name: c, model: org/c}
"""


def test_the_plan_gives_standby_workers_sleep_mode_and_shows_the_ledger():
    text = garden_text(STANDBY_GARDEN, gpus="{name: L4, memory: 24GiB, count: 1}")
    plan = plan_for(text, budgets={"a": 14, "b": 14, "c": 2})
    workers = {s.worker.model: s.worker for s in plan.steps if s.worker is not None}
    for name in ("a", "b"):
        assert "--enable-sleep-mode" in workers[name].argv
        assert dict(workers[name].env)["VLLM_SERVER_DEV_MODE"] == "1"
        assert workers[name].standby is not None
    assert workers["a"].standby.level == 1 and workers["b"].standby.level == 2
    assert workers["c"].standby is None and "--enable-sleep-mode" not in workers["c"].argv
    assert "VLLM_SERVER_DEV_MODE" not in dict(workers["c"].env)
    document = plan_to_json(plan)
    gpu = document["gpus"][0]
    assert [s["worker"] for s in gpu["standby_after"]] == ["lab/a/0", "lab/b/0"]
    assert gpu["wake_slot_bytes"] == max(s["awake_bytes"] - s["asleep_bytes"]
                                         for s in gpu["standby_after"])
    assert json.dumps(document) == json.dumps(plan_to_json(plan_for(
        text, budgets={"a": 14, "b": 14, "c": 2})))  # same input, same plan
    # the records keep what a standby worker is, and read it back
    from gardenctl.workers import DesiredWorker

    assert DesiredWorker.from_json(workers["b"].to_json()) == workers["b"]
    assert "standby" not in workers["c"].to_json()


def test_a_new_idle_timeout_restarts_nothing_a_new_level_or_standby_replaces():
    from builders import observed_from

    text = garden_text(STANDBY_GARDEN, gpus="{name: L4, memory: 24GiB, count: 1}")
    budgets = {"a": 14, "b": 14, "c": 2}
    running = observed_from(plan_for(text, budgets=budgets))
    edited = text.replace(b"idle_timeout: 2m", b"idle_timeout: 30s")
    assert plan_for(edited, running, budgets=budgets).converged
    made_standby = text.replace(b"model: org/c}", b"model: org/c, standby: sleep}")
    steps = plan_for(made_standby, running, budgets=budgets).steps
    assert [s.kind.value for s in steps if not s.conditional and s.worker_id == "lab/c/0"] \
        == ["replace"]
    # the level is how the running worker sleeps, and what host RAM the plan books for it
    deeper = text.replace(b"standby: sleep}", b"standby: {mode: sleep, level: 2}}")
    steps = plan_for(deeper, running, budgets=budgets).steps
    assert [s.kind.value for s in steps if not s.conditional and s.worker_id == "lab/a/0"] \
        == ["replace"]
    assert dict(next(s for s in steps if s.worker_id == "lab/a/0").worker.env)[
        "GARDENCTL_SLEEP_LEVEL"] == "2"


@pytest.mark.parametrize("bad, says", [
    ("standby: nap", "models[0].standby: invalid value 'nap' (expected one of 'sleep' or 'stop')"),
    ("standby: {mode: sleep, level: 3}", "standby.level"),
    ("standby: {mode: sleep, idle_timeout: -1}", "standby.idle_timeout"),
    ("args: [--enable-sleep-mode]", "set `standby` instead"),
])
def test_bad_standby_settings_are_refused_with_where_and_what(bad, says):
    text = garden_text(f"  - name: a\n    model: org/a\n    {bad}\n")
    with pytest.raises(SpecError) as caught:
        loaded = parse_garden(text, "garden.yaml")
        if loaded.errors:  # checks beyond the schema (args) are reported, not raised
            raise SpecError("\n".join(issue.format() for issue in loaded.errors))
    assert says in str(caught.value) and "garden.yaml:" in str(caught.value)


def test_apply_puts_standby_workers_to_sleep_once_ready_and_neighbours_before_a_start():
    from test_execute import fake, run

    models = ("  - {name: a, model: org/a, max_model_len: 1024, standby: sleep}\n"
              "  - {name: c, model: org/c, max_model_len: 1024}\n")
    text = garden_text(models, gpus="{name: L4, memory: 24GiB, count: 1}")
    budgets = {"a": 14, "b": 14, "c": 2}
    runtime, clock = fake()
    report = run(plan_for(text, budgets=budgets), runtime, clock)
    assert report.ok
    messages = {r.worker_id: r.message for r in report.results}
    assert "asleep until a request comes (standby, level 1)" in messages["lab/a/0"]
    assert runtime.is_sleeping("lab/a/0") is True
    assert runtime.is_sleeping("lab/c/0") is None  # always awake: no sleep mode at all

    runtime.wake_up("lab/a/0")  # the gateway woke it for a request
    assert runtime.is_sleeping("lab/a/0") is False
    added = text + b"  - {name: b, model: org/b, max_model_len: 1024, standby: sleep}\n"
    plan = plan_for(added, runtime.observe(confirm_health=False), budgets=budgets)
    assert [s.worker_id for s in plan.steps if s.kind.value == "start"] == ["lab/b/0"]
    report = run(plan, runtime, clock)
    assert report.ok
    # b started in the GPU's wake slot: a was put to sleep first; then b went to sleep too
    assert runtime.is_sleeping("lab/a/0") is True
    assert runtime.is_sleeping("lab/b/0") is True


def test_stop_mode_workers_run_only_while_a_gateway_demands_them():
    from builders import observed_from

    from gardenctl.observe import Observed
    from gardenctl.reconcile import Circumstances

    models = ("  - {name: a, model: org/a, standby: stop}\n"
              "  - {name: b, model: org/b, standby: {mode: stop, idle_timeout: 1m}}\n")
    text = garden_text(models, gpus="{name: L4, memory: 24GiB, count: 1}")
    budgets = {"a": 14, "b": 14}
    idle = plan_for(text, budgets=budgets)
    # both are booked (nothing asleep, one wake slot) but neither starts: nothing needs them
    assert idle.converged
    assert {(s.kind.value, s.cause) for s in idle.steps} == {
        ("keep", "stopped until a request for it reaches the gateway (standby: stop)")}
    gpu = plan_to_json(idle)["gpus"][0]
    assert [s["asleep_bytes"] for s in gpu["standby_after"]] == [0, 0]
    worker = idle.steps[0].worker
    assert "--enable-sleep-mode" not in worker.argv
    assert "VLLM_SERVER_DEV_MODE" not in dict(worker.env)
    assert worker.standby.mode == "stop" and not worker.standby.sleeps

    demanded = plan_for(text, budgets=budgets, world=Circumstances(demand=frozenset({"lab/a/0"})))
    assert {s.worker_id: s.kind.value for s in demanded.steps} == {"lab/a/0": "start",
                                                                   "lab/b/0": "keep"}
    started = observed_from(demanded)
    running = Observed(tuple(w for w in started.workers if w.worker_id == "lab/a/0"), "test")
    assert plan_for(text, running, budgets=budgets,
                    world=Circumstances(demand=frozenset({"lab/a/0"}))).converged
    stopping = plan_for(text, running, budgets=budgets)  # the gateway let it go (idle)
    step = next(s for s in stopping.steps if s.worker_id == "lab/a/0")
    assert step.kind.value == "stop" and "idle" in step.cause
    assert step.worker is not None  # its place stays planned (the gateway reads it)
