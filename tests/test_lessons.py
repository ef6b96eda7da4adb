"""Memory lessons: what a failed start teaches the model's next attempt (gardenctl.lessons)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from builders import estimate, garden_text, observed_from, plan_for

from gardenctl.estimate.types import Item
from gardenctl.lessons import Lesson, applicable, learn
from gardenctl.spec import parse_garden
from gardenctl.units import GiB
from gardenctl.vocab import Cause, Phase
from gardenctl.workers import sizing_hash

L4 = 24 * GiB  # the builders' GPUs


def failed(cause: str, models: str = "  - {name: a, model: org/a, min_concurrency: 2}\n",
           **facts):
    """The garden's model, its sizing hash, and its worker failed with ``cause`` and
    ``facts`` (as the diagnosis stores them)."""
    text = garden_text(models)
    worker = observed_from(plan_for(text, budgets={"a": 8}), "failed").workers[0]
    worker = replace(worker, phase=Phase.FAILED, cause=Cause(cause),
                     facts=tuple(sorted(facts.items())))
    loaded = parse_garden(text, "garden.yaml")
    model = loaded.garden.resolved_models()[0]
    return worker, model, sizing_hash(model, loaded.garden.placement)


def with_kv(budget_gib: float, kv_gib: float):
    return replace(estimate(budget_gib), kv_cache=Item(int(kv_gib * GiB), "test"))


def test_a_kv_cache_too_small_grows_the_budget_to_hold_min_concurrency_sequences():
    # vLLM says one sequence needs 2 GiB and 1 GiB was there; the model asks for 2 sequences.
    worker, model, sizing = failed("kv_cache_too_small", kv_needed_bytes=2 * GiB,
                                   kv_available_bytes=1 * GiB, suggested_max_model_len=2048)
    lesson = learn(worker, model, sizing, with_kv(8, 4), L4, None)
    assert lesson is not None
    budget = worker.utilization * L4
    grown = lesson.gpu_memory_utilization * L4 - budget
    assert 3.15 * GiB <= grown < 3.15 * GiB + 0.001 * L4 + 1  # 2 x 2 - 1 GiB short, plus 5%
    assert lesson.overrides() == {"gpu_memory_utilization": lesson.gpu_memory_utilization}
    assert "1.00 GiB available" in lesson.reason and "gpu_memory_utilization" in lesson.reason
    # The same failed run teaches once; a run from before the lesson teaches nothing.
    assert learn(worker, model, sizing, with_kv(8, 4), L4, lesson) is None
    stale = replace(worker, spec=replace(worker.spec, spec_hash="another-replica-before"))
    assert learn(stale, model, sizing, with_kv(8, 4), L4, lesson) is None
    # A log's figures are believed within bounds (its model's code writes it).
    greedy, _, _ = failed("kv_cache_too_small", kv_needed_bytes=500 * GiB,
                          kv_available_bytes=0)
    bounded = learn(greedy, model, sizing, with_kv(8, 0.5), L4, None)
    assert bounded is not None
    assert (bounded.gpu_memory_utilization - greedy.utilization) * L4 <= 2.2 * GiB


def test_a_grow_and_a_shrink_never_alternate():
    worker, model, sizing = failed("kv_cache_too_small", kv_needed_bytes=2 * GiB,
                                   kv_available_bytes=1 * GiB)
    grown = learn(worker, model, sizing, with_kv(8, 4), L4, None)
    assert grown is not None and grown.direction == "grow"
    # The grown start then fails the free-memory check: something else holds the memory.
    after = replace(worker, cause=Cause.FREE_MEMORY_CHECK,
                    spec=replace(worker.spec, spec_hash="grown-run",
                                 utilization=grown.gpu_memory_utilization),
                    facts=(("free_bytes", 9 * GiB),))
    assert learn(after, model, sizing, with_kv(8, 4), L4, grown) is None  # the failure stands


def test_the_free_memory_check_shrinks_to_what_was_free_but_not_below_what_is_needed():
    worker, model, sizing = failed("insufficient_free_memory", free_bytes=6 * GiB,
                                   requested_bytes=9 * GiB, total_bytes=L4)
    lesson = learn(worker, model, sizing, estimate(5), L4, None)
    assert lesson is not None and lesson.gpu_memory_utilization is not None
    assert lesson.gpu_memory_utilization * L4 <= 6 * GiB * 0.98 + 1
    # What min_concurrency needs (the estimate's budget) is more than was free: no resize.
    assert learn(worker, model, sizing, estimate(7), L4, None) is None


def test_a_sampler_oom_halves_max_num_seqs_never_below_min_concurrency():
    worker, model, sizing = failed("sampler_out_of_memory")
    first = learn(worker, model, sizing, estimate(8), L4, None)
    assert first is not None and first.max_num_seqs == 512  # vLLM's default 1024, halved
    worker, model, sizing = failed(
        "sampler_out_of_memory", "  - {name: a, model: org/a, min_concurrency: 3, "
        "max_num_seqs: 4}\n")
    lesson = learn(worker, model, sizing, estimate(8), L4, None)
    assert lesson is not None and lesson.max_num_seqs == 3
    at_floor = replace(worker, spec=replace(worker.spec, spec_hash="next-run",
                                            argv=(*worker.spec.argv, "--max-num-seqs", "3")))
    assert learn(at_floor, model, sizing, estimate(8), L4, lesson) is None


@pytest.mark.parametrize("cause", ["out_of_memory", "port_in_use", "model_not_found"])
def test_other_failures_teach_nothing(cause):
    worker, model, sizing = failed(cause)
    assert learn(worker, model, sizing, estimate(8), L4, None) is None


def test_on_memory_error_fail_keeps_the_model_as_declared():
    worker, model, sizing = failed(
        "kv_cache_too_small", "  - {name: a, model: org/a, on_memory_error: fail}\n",
        kv_needed_bytes=2 * GiB, kv_available_bytes=GiB)
    assert learn(worker, model, sizing, estimate(8), L4, None) is None


def test_a_lesson_is_forgotten_once_the_model_is_edited():
    lesson = Lesson("a", "hash-as-declared", "run", 0.5, None, "why")
    assert applicable({"a": lesson}, {"a": "hash-as-declared"}) == {"a": lesson}
    assert applicable({"a": lesson}, {"a": "hash-after-an-edit"}) == {}
    assert Lesson.from_json(lesson.to_json()) == lesson


def test_a_lesson_resizes_the_failed_replica_and_leaves_the_healthy_one_alone():
    from gardenctl.inventory.declared import inventory_from_spec
    from gardenctl.planner import make_plan
    from gardenctl.vocab import StepKind

    text = garden_text("  - {name: a, model: org/a, replicas: 2}\n")
    first = plan_for(text, budgets={"a": 8})
    observed = observed_from(first, "ready")
    ready, failing = observed.workers
    failing = replace(failing, phase=Phase.FAILED, cause=Cause.KV_CACHE_TOO_SMALL)
    observed = replace(observed, workers=(ready, failing))
    loaded = parse_garden(text, "garden.yaml").with_overrides(
        {"a": {"gpu_memory_utilization": round(failing.utilization + 0.05, 3)}})
    inventory = inventory_from_spec(loaded.garden.inventory, "declared")
    plan = make_plan(loaded, inventory, observed, {"a": estimate(8)})
    steps = {s.worker_id: s for s in plan.steps if not s.conditional}
    assert steps[ready.worker_id].kind == StepKind.KEEP
    restart = steps[failing.worker_id]
    assert restart.kind == StepKind.RESTART
    assert restart.worker.utilization == round(failing.utilization + 0.05, 3)
