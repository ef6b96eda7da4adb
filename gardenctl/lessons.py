"""Memory lessons: what a failed start's log taught, applied to the model's next attempt (pure).

When a worker's start fails for memory, vLLM's log says by how much (the diagnosis reads it:
gardenctl.runtime.diagnose). With `on_memory_error: resize` (the default) the model's next
attempt changes what the numbers say must change, and nothing else:

- KV cache too small for one max_model_len sequence: the budget grows by what was missing
  (`kv_needed - kv_available`, plus 5%), so `gpu_memory_utilization` rises;
- no memory left for cache blocks: the budget grows by the KV cache the model needs (the
  estimate's, for min_concurrency sequences) plus what was short;
- the start-up free-memory check (something else holds memory on the GPU): the budget shrinks to
  what was free (less 2%), but never below what min_concurrency needs (the estimate's budget);
- out of memory in the sampler warm-up: `max_num_seqs` halves, never below min_concurrency.

A lesson holds while the model is declared as it was when the lesson was learned (its sizing
hash); editing the model forgets it. Each failed run teaches once (the lesson remembers the run's
spec hash), and a lesson builds on the one before, so a crash loop never repeats the same claim.
Where no change can help (the GPU is too small, min_concurrency would be broken, `fail`), there
is no lesson and the failure stands, explained.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gardenctl.estimate.types import MemoryEstimate
from gardenctl.observe import ObservedWorker
from gardenctl.spec.models import ModelSpec
from gardenctl.units import MiB, format_gib

KV_TOO_SMALL = "kv_cache_too_small"
NO_CACHE_BLOCKS = "no_cache_blocks"
FREE_MEMORY = "insufficient_free_memory"
SAMPLER_OOM = "sampler_out_of_memory"
MEMORY_CAUSES = frozenset({KV_TOO_SMALL, NO_CACHE_BLOCKS, FREE_MEMORY, SAMPLER_OOM})

GROWTH_MARGIN = 0.05  # more than the log said was missing: vLLM's own figures are rounded
GROWTH_FLOOR = 64 * MiB
FREE_MARGIN = 0.02  # below what was free: the CUDA context and rounding
MAX_UTILIZATION = 0.98
KV_BOUND_FACTOR = 4  # a KV shortfall is believed up to 4x the KV cache the estimate gives
DEFAULT_MAX_NUM_SEQS = 1024  # vLLM's serve default on >= 70 GiB GPUs (the estimate's too)


@dataclass(frozen=True)
class Lesson:
    model: str
    sizing: str  # the model's sizing hash as declared when this was learned
    learned_from: str  # spec hash of the failed run it was learned from
    gpu_memory_utilization: float | None
    max_num_seqs: int | None
    reason: str  # what failed, and what changes
    direction: str = ""  # "grow" | "shrink" | "": the budget's; it never turns back

    def overrides(self) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        if self.gpu_memory_utilization is not None:
            changes["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.max_num_seqs is not None:
            changes["max_num_seqs"] = self.max_num_seqs
        return changes

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "sizing": self.sizing, "learned_from": self.learned_from,
                "gpu_memory_utilization": self.gpu_memory_utilization,
                "max_num_seqs": self.max_num_seqs, "reason": self.reason,
                "direction": self.direction}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Lesson:
        utilization = data.get("gpu_memory_utilization")
        seqs = data.get("max_num_seqs")
        return cls(str(data["model"]), str(data["sizing"]), str(data["learned_from"]),
                   float(utilization) if utilization is not None else None,
                   int(seqs) if seqs is not None else None, str(data.get("reason", "")),
                   str(data.get("direction", "")))


def applicable(lessons: Mapping[str, Lesson], declared: Mapping[str, str]) -> dict[str, Lesson]:
    """The lessons whose model is still declared as when they were learned
    (``declared``: model name -> sizing hash of the model as the file declares it)."""
    return {name: lesson for name, lesson in lessons.items()
            if declared.get(name) == lesson.sizing}


def learn(worker: ObservedWorker, model: ModelSpec, declared_sizing: str,
          estimate: MemoryEstimate, gpu_total_bytes: int | None,
          previous: Lesson | None) -> Lesson | None:
    """The lesson of ``worker``'s failed run, or None when it teaches nothing new (not a
    memory failure, learned already, a run from before the last lesson, `on_memory_error:
    fail`, or no change could help)."""
    cause = worker.cause.value if worker.cause is not None else ""
    if cause not in MEMORY_CAUSES or model.on_memory_error != "resize":
        return None
    if worker.spec.sizing_hash != declared_sizing:
        return None  # it ran another version of the model
    if previous is not None and (previous.learned_from == worker.spec.spec_hash
                                 or not _ran_as_taught(worker, previous)):
        return None  # learned already, or a run from before the last lesson
    total = gpu_total_bytes or 0  # the inventory's: a log's own total is not trusted here
    budget = math.ceil(worker.utilization * total) if total else 0
    utilization = previous.gpu_memory_utilization if previous else None
    max_num_seqs = previous.max_num_seqs if previous else None
    direction = previous.direction if previous else ""
    if cause == SAMPLER_OOM:
        current = _current_max_num_seqs(worker, model, previous)
        smaller = max(model.min_concurrency, current // 2)
        if smaller >= current:
            return None
        max_num_seqs = smaller
        reason = (f"out of memory in the sampler warm-up with max_num_seqs {current}: "
                  f"next start with max_num_seqs {smaller}")
    else:
        if not total or not budget:
            return None
        wanted, why = _budget_wanted(cause, worker, model, estimate, budget)
        if wanted is None:
            return None
        way = "grow" if wanted > budget else "shrink"
        if direction and way != direction:
            return None  # it needs more than the GPU has free: no resize can help
        new = _round_up(wanted / total) if way == "grow" else _round_down(wanted / total)
        if new > MAX_UTILIZATION or new <= 0 or new == round(worker.utilization, 3):
            return None
        if way == "shrink" and new * total < estimate.budget_bytes:
            return None  # below what min_concurrency needs
        utilization, direction = new, way
        reason = (f"{why}: next start with gpu_memory_utilization "
                  f"{worker.utilization:.3f} -> {new:.3f}")
    return Lesson(model=model.name, sizing=declared_sizing, learned_from=worker.spec.spec_hash,
                  gpu_memory_utilization=utilization, max_num_seqs=max_num_seqs, reason=reason,
                  direction=direction)


def _ran_as_taught(worker: ObservedWorker, lesson: Lesson) -> bool:
    """Did ``worker``'s run use what ``lesson`` says (else it failed before it was learned)?"""
    from gardenctl.argv import flag_value

    if lesson.gpu_memory_utilization is not None \
            and round(worker.utilization, 3) != round(lesson.gpu_memory_utilization, 3):
        return False
    if lesson.max_num_seqs is not None:
        return flag_value(worker.spec.argv, "--max-num-seqs") == str(lesson.max_num_seqs)
    return True


def _budget_wanted(cause: str, worker: ObservedWorker, model: ModelSpec,
                   estimate: MemoryEstimate, budget: int) -> tuple[int | None, str]:
    """The budget (bytes, per GPU) the next start should have, and why. What the log says is
    believed only within bounds: the model's own code writes that log."""
    bound = KV_BOUND_FACTOR * max(estimate.kv_cache.bytes, GROWTH_FLOOR)
    if cause == KV_TOO_SMALL:
        needed, available = worker.fact("kv_needed_bytes"), worker.fact("kv_available_bytes")
        if needed is None or available is None or needed <= available:
            return None, ""
        # vLLM's figure is for one sequence; the worker must hold min_concurrency of them
        short = min(bound, int(needed) * model.min_concurrency - int(available))
        grow = max(GROWTH_FLOOR, math.ceil(short * (1 + GROWTH_MARGIN)))
        return budget + grow, (f"the KV cache could not hold one sequence ({format_gib(needed)} "
                               f"needed, {format_gib(available)} available)")
    if cause == NO_CACHE_BLOCKS:
        available = int(worker.fact("kv_available_bytes") or 0)
        short = min(bound, estimate.kv_cache.bytes - min(0, available))
        grow = max(GROWTH_FLOOR, math.ceil(short * (1 + GROWTH_MARGIN)))
        return budget + grow, (f"no memory was left for the KV cache ({format_gib(available)} "
                               f"available, {format_gib(estimate.kv_cache.bytes)} needed)")
    if cause == FREE_MEMORY:
        free = worker.fact("free_bytes")
        if free is None:
            return None, ""
        fits = math.floor(int(free) * (1 - FREE_MARGIN))
        if fits >= budget:
            return None, ""  # only ever shrinks: a log cannot raise a claim this way
        return fits, (f"only {format_gib(free)} was free on the GPU at start-up, "
                      f"{format_gib(budget)} was asked")
    return None, ""


def _current_max_num_seqs(worker: ObservedWorker, model: ModelSpec,
                          previous: Lesson | None) -> int:
    from gardenctl.argv import flag_value

    value = flag_value(worker.spec.argv, "--max-num-seqs")
    if value is not None and value.isdigit():
        ran = int(value)
    elif previous is not None and previous.max_num_seqs is not None:
        ran = previous.max_num_seqs
    else:
        ran = model.max_num_seqs or DEFAULT_MAX_NUM_SEQS
    logged = worker.fact("sampler_requests")  # the warm-up's dummy requests = max_num_seqs
    return min(ran, int(logged)) if logged else ran  # a log never raises it


def _round_up(fraction: float) -> float:
    return math.ceil(fraction * 1000) / 1000


def _round_down(fraction: float) -> float:
    return math.floor(fraction * 1000) / 1000
