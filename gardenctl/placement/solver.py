"""place(): give every wanted worker a node, GPUs and a --gpu-memory-utilization, or reasons.

Pure: values in, values out. The rules, in order:
1. Workers already running stay where they are when the garden still wants them unchanged
   (same sizing hash, GPUs still present, pins still satisfied). Their claims come first.
2. The others are placed highest priority first, then pinned ones (they have the fewest
   options), then multi-GPU workers, then largest first (best-fit decreasing); ties break by
   worker id, so the same input gives the same plan.
3. A GPU admits a new worker only under `accepts_new_worker` (the min-available threshold), and
   only if the worker's claim fits in what is left after others' use, our claims and the reserve:
   the solver never over-commits a GPU.
4. Best fit: the GPU (or, for tensor parallelism, the set of GPUs of one size on one node)
   that leaves the least free memory; replicas of one model prefer GPUs that hold no sibling.
5. A worker whose new version does not fit while its old version runs keeps the old one's place
   (reported as unplaced with `kept_previous`), so a bad edit never takes a model down.
6. Under the `fill` policy, the spare memory of each GPU is then shared among its new workers.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

from gardenctl.inventory.model import Inventory
from gardenctl.placement import model as m
from gardenctl.placement.ledger import GpuKey, Pool
from gardenctl.placement.utilization import (
    UTILIZATION_STEP,
    claim_bytes,
    fit_utilization,
    tiered_utilization,
)
from gardenctl.spec.models import PlacementPolicy
from gardenctl.units import floor_to, format_size

STRATEGIES = ("best_fit", "most_free", "first_fit", "random")
MAX_REASONS = 4


@dataclass(frozen=True)
class _Choice:
    node: str
    gpus: tuple[int, ...]
    utilization: float
    claim: int


def place(
    requests: Sequence[m.WorkerRequest],
    inventory: Inventory,
    policy: PlacementPolicy,
    holdings: Sequence[m.Holding] = (),
    others: dict[GpuKey, int] | None = None,
    *,
    strategy: str = "best_fit",
    seed: int = 0,
) -> m.Placement:
    """Place ``requests`` on ``inventory``. ``others`` is memory used by processes that are not
    ours, per GPU (default: each GPU's used_bytes). ``strategy`` other than best_fit exists to
    compare with the seed projects' policies in benchmarks."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    gpus = sorted(inventory.gpus, key=lambda g: g.key)
    others = others if others is not None else {g.key: g.used_bytes for g in gpus}
    by_id = {r.worker_id: r for r in requests}
    present = {g.key for g in gpus}

    kept: list[m.Assignment] = []
    changed: dict[str, m.Holding] = {}
    for holding in sorted(holdings, key=lambda h: h.worker_id):
        request = by_id.get(holding.worker_id)
        if request is None:
            continue
        if _may_stay(holding, request, present):
            kept.append(m.Assignment(holding.worker_id, holding.model, holding.node, holding.gpus,
                                     holding.utilization, holding.claim_bytes, kept=True))
        else:
            changed[holding.worker_id] = holding
    kept_ids = {a.worker_id for a in kept}
    pending = sorted((r for r in requests if r.worker_id not in kept_ids), key=_order)

    held_back: dict[str, m.Holding] = {}
    while True:
        pool = Pool(gpus, others, policy.reserve, policy.min_available_gpu_fraction)
        for assignment in kept:
            for index in assignment.gpus:
                pool.add_claim((assignment.node, index), assignment.worker_id, assignment.model,
                               assignment.claim_bytes)
        for holding in held_back.values():
            for index in holding.gpus:
                pool.add_claim((holding.node, index), holding.worker_id, holding.model,
                               holding.claim_bytes)
        rng = random.Random(seed)
        placed: list[m.Assignment] = []
        failed: list[m.Unplaced] = []
        for request in pending:
            if request.worker_id in held_back:
                failed.append(_unplaced_kept_previous(request, held_back[request.worker_id], pool,
                                                      policy))
                continue
            choice = _choose(request, pool, policy, strategy, rng)
            if choice is None:
                failed.append(m.Unplaced(request.worker_id, request.model,
                                         tuple(_reasons(request, pool, policy))))
                continue
            for index in choice.gpus:
                pool.add_claim((choice.node, index), request.worker_id, request.model, choice.claim)
            placed.append(m.Assignment(request.worker_id, request.model, choice.node, choice.gpus,
                                       choice.utilization, choice.claim, kept=False))
        newly_held = {u.worker_id for u in failed if u.worker_id in changed} - set(held_back)
        if not newly_held:
            break
        held_back.update({worker_id: changed[worker_id] for worker_id in newly_held})

    if policy.utilization_policy == "fill":
        placed = _fill(placed, pool, {r.worker_id: r for r in pending}, policy)
    assignments = tuple(sorted(kept + placed, key=lambda a: a.worker_id))
    after = {a.worker_id: a for a in assignments}
    after.update({h.worker_id: _as_assignment(h) for h in held_back.values()})
    ledgers = _ledger_rows(gpus, others, policy.reserve, holdings, after.values())
    return m.Placement(assignments, tuple(sorted(failed, key=lambda u: u.worker_id)), ledgers)


def _order(request: m.WorkerRequest) -> tuple:
    """Highest priority first; within a priority the most constrained first (pinned, then
    multi-GPU), then the largest (best-fit decreasing); ties by worker id."""
    pinned = request.pin_node is not None or request.pin_gpus is not None
    return (-request.priority, not pinned, -request.tensor_parallel_size,
            -request.estimate.total_bytes, request.worker_id)


def _may_stay(holding: m.Holding, request: m.WorkerRequest, present: set[GpuKey]) -> bool:
    if holding.sizing_hash != request.sizing_hash:
        return False
    if len(holding.gpus) != request.tensor_parallel_size:
        return False
    if any((holding.node, index) not in present for index in holding.gpus):
        return False
    if request.pin_node is not None and holding.node != request.pin_node:
        return False
    if request.pin_gpus is not None and not set(holding.gpus) <= set(request.pin_gpus):
        return False
    return True


def _as_assignment(holding: m.Holding) -> m.Assignment:
    return m.Assignment(holding.worker_id, holding.model, holding.node, holding.gpus,
                        holding.utilization, holding.claim_bytes, kept=True)


def utilization_for(request: m.WorkerRequest, total: int, policy: PlacementPolicy) -> float:
    """F for this worker on a GPU of ``total`` bytes (may exceed 1: it then cannot go there)."""
    if request.utilization is not None:
        return request.utilization
    if policy.utilization_policy == "tiered":
        return tiered_utilization(request.estimate, total)
    return fit_utilization(request.estimate, total, policy.safety_margin)


def _claim(request: m.WorkerRequest, total: int, policy: PlacementPolicy) -> tuple[float, int] | None:
    utilization = utilization_for(request, total, policy)
    if utilization > 1.0:
        return None
    return utilization, claim_bytes(utilization, total, request.estimate.cuda_context.bytes)


def _candidate_keys(request: m.WorkerRequest, pool: Pool) -> list[GpuKey]:
    keys = sorted(pool.accounts)
    if request.pin_node is not None:
        keys = [k for k in keys if k[0] == request.pin_node]
    if request.pin_gpus is not None:
        keys = [k for k in keys if k[1] in request.pin_gpus]
    return keys


def _choose(request: m.WorkerRequest, pool: Pool, policy: PlacementPolicy, strategy: str,
            rng: random.Random) -> _Choice | None:
    pinned = request.pin_node is not None or request.pin_gpus is not None
    if request.tensor_parallel_size == 1 and strategy == "best_fit" and not pinned:
        return _best_fit_single(request, pool, policy)
    if request.tensor_parallel_size == 1:
        return _scan_single(request, pool, policy, strategy, rng)
    return _best_fit_group(request, pool, policy)


def _best_fit_single(request: m.WorkerRequest, pool: Pool, policy: PlacementPolicy) -> _Choice | None:
    best: tuple | None = None
    for total, entries in pool.by_size.items():
        claim = _claim(request, total, policy)
        if claim is None:
            continue
        need = pool.min_free_for(total, claim[1])
        start = bisect.bisect_left(entries, (need, "", -1))
        if start == len(entries):
            continue
        found = None
        for free, node, index in entries[start:]:
            if pool.accounts[(node, index)].models.get(request.model, 0) == 0:
                found = (0, free - claim[1], node, index)
                break
        if found is None:
            free, node, index = entries[start]
            found = (1, free - claim[1], node, index)
        candidate = found + (claim,)
        if best is None or candidate[:4] < best[:4]:
            best = candidate
    if best is None:
        return None
    _, _, node, index, (utilization, claim_amount) = best
    return _Choice(node, (index,), utilization, claim_amount)


def _scan_single(request: m.WorkerRequest, pool: Pool, policy: PlacementPolicy, strategy: str,
                 rng: random.Random) -> _Choice | None:
    fits = []
    for key in _candidate_keys(request, pool):
        total = pool.accounts[key].gpu.total_bytes
        claim = _claim(request, total, policy)
        if claim is None or pool.free[key] < pool.min_free_for(total, claim[1]):
            continue
        fits.append((key, claim))
    if not fits:
        return None
    if strategy == "random":
        key, claim = rng.choice(fits)
    elif strategy == "first_fit":
        key, claim = fits[0]
    elif strategy == "most_free":
        key, claim = max(fits, key=lambda f: (pool.free[f[0]], _neg(f[0])))
    else:  # best fit among pinned GPUs, siblings last
        key, claim = min(fits, key=lambda f: (pool.accounts[f[0]].models.get(request.model, 0) > 0,
                                              pool.free[f[0]] - f[1][1], f[0]))
    return _Choice(key[0], (key[1],), claim[0], claim[1])


def _neg(key: GpuKey) -> tuple:
    # For max(): prefer the lowest (node, index) among equals.
    return tuple(-ord(c) for c in key[0]) + (-key[1],)


def _best_fit_group(request: m.WorkerRequest, pool: Pool, policy: PlacementPolicy) -> _Choice | None:
    """Tensor parallelism: ``tp`` GPUs of one size on one node, the set leaving least free."""
    tp = request.tensor_parallel_size
    best: tuple | None = None
    allowed = None if request.pin_gpus is None else set(request.pin_gpus)
    for (node, total), entries in sorted(pool.by_node_size.items()):
        if request.pin_node is not None and node != request.pin_node:
            continue
        if len(entries) < tp:
            continue
        claim = _claim(request, total, policy)
        if claim is None:
            continue
        need = pool.min_free_for(total, claim[1])
        start = bisect.bisect_left(entries, (need, -1))
        chosen = [(free, index) for free, index in entries[start:]
                  if allowed is None or index in allowed]
        if len(chosen) < tp:
            continue
        chosen = chosen[:tp]
        leftover = sum(free - claim[1] for free, _ in chosen)
        candidate = (leftover, node, tuple(sorted(index for _, index in chosen)), claim)
        if best is None or candidate[:3] < best[:3]:
            best = candidate
    if best is None:
        return None
    _, node, indexes, (utilization, claim_amount) = best
    return _Choice(node, indexes, utilization, claim_amount)


def _reasons(request: m.WorkerRequest, pool: Pool, policy: PlacementPolicy) -> Iterable[m.Reason]:
    """Why no GPU took the worker: the most promising GPUs tried, each with numbers."""
    if not pool.accounts:
        yield m.Reason(m.NO_GPUS, "the inventory has no GPUs")
        return
    if request.pin_node is not None and not any(k[0] == request.pin_node for k in pool.accounts):
        yield m.Reason(m.PINNED_NODE_MISSING,
                       f"pinned to node {request.pin_node!r}, which is not in the inventory",
                       node=request.pin_node)
        return
    keys = _candidate_keys(request, pool)
    if request.pin_gpus is not None:
        nodes = {request.pin_node} if request.pin_node else {k[0] for k in pool.accounts}
        for node in sorted(n for n in nodes if n is not None):
            present = {k[1] for k in pool.accounts if k[0] == node}
            missing = sorted(set(request.pin_gpus) - present)
            if missing:
                yield m.Reason(m.PINNED_GPU_MISSING,
                               f"pinned GPU(s) {', '.join(map(str, missing))} do not exist on "
                               f"{node}", node=node)
    if not keys:
        return
    tp = request.tensor_parallel_size
    if tp > 1:
        sizes = {}
        for key in keys:
            sizes[key[0]] = sizes.get(key[0], 0) + 1
        if max(sizes.values()) < tp:
            yield m.Reason(m.NOT_ENOUGH_GPUS,
                           f"needs {tp} GPUs on one node; the largest node has "
                           f"{max(sizes.values())}", requested_bytes=None)
            return
    ranked = sorted(keys, key=lambda k: (-pool.free[k], k))
    for key in ranked[:MAX_REASONS]:
        yield _gpu_reason(request, pool, policy, key)
    if len(ranked) > MAX_REASONS:
        yield m.Reason(m.MORE_GPUS, f"{len(ranked) - MAX_REASONS} more GPU(s) with less free "
                       "memory were tried")
    if tp > 1:
        yield m.Reason(m.NOT_ENOUGH_GPUS,
                       f"needs {tp} GPUs of one size on one node that can each take the claim")


def _gpu_reason(request: m.WorkerRequest, pool: Pool, policy: PlacementPolicy,
                key: GpuKey) -> m.Reason:
    account = pool.accounts[key]
    total = account.gpu.total_bytes
    free = pool.free[key]
    label = account.gpu.label
    utilization = utilization_for(request, total, policy)
    if utilization > 1.0:
        need = request.estimate.total_bytes
        return m.Reason(m.EXCEEDS_GPU,
                        f"{label}: needs {format_size(need)} per GPU, more than its "
                        f"{format_size(total)} in all", node=key[0], gpu=key[1],
                        requested_bytes=need, free_bytes=free, total_bytes=total)
    claim = claim_bytes(utilization, total, request.estimate.cuda_context.bytes)
    if not pool.admits(key):
        unclaimed = (total - account.others - account.claimed) / total
        return m.Reason(m.BELOW_MIN_AVAILABLE,
                        f"{label}: only {unclaimed:.0%} of it is unclaimed, below "
                        f"min_available_gpu_fraction {policy.min_available_gpu_fraction:.0%}",
                        node=key[0], gpu=key[1], requested_bytes=claim, free_bytes=free,
                        total_bytes=total)
    return m.Reason(m.INSUFFICIENT_MEMORY,
                    f"{label}: needs {format_size(claim)}, {format_size(max(free, 0))} free",
                    node=key[0], gpu=key[1], requested_bytes=claim, free_bytes=free,
                    total_bytes=total)


def _unplaced_kept_previous(request: m.WorkerRequest, holding: m.Holding, pool: Pool,
                            policy: PlacementPolicy) -> m.Unplaced:
    reasons = tuple(_reasons(request, pool, policy))
    note = m.Reason("kept_previous", f"the running version stays on {holding.node} GPU "
                    f"{','.join(map(str, holding.gpus))} until the new one fits",
                    node=holding.node)
    return m.Unplaced(request.worker_id, request.model, reasons + (note,), kept_previous=True)


def _fill(placed: list[m.Assignment], pool: Pool, requests: dict[str, m.WorkerRequest],
          policy: PlacementPolicy) -> list[m.Assignment]:
    """Share each GPU's spare memory among the new, auto-sized workers on it (more KV cache)."""
    growable = {a.worker_id for a in placed if requests[a.worker_id].utilization is None}
    sharers: dict[GpuKey, int] = {}
    for a in placed:
        if a.worker_id in growable:
            for index in a.gpus:
                sharers[(a.node, index)] = sharers.get((a.node, index), 0) + 1
    result = []
    for a in placed:
        if a.worker_id not in growable:
            result.append(a)
            continue
        keys = [(a.node, index) for index in a.gpus]
        extra = min(max(pool.free[k], 0) // sharers[k] for k in keys) - 1024 * 1024
        total = pool.accounts[keys[0]].gpu.total_bytes
        grow = floor_to(max(extra, 0) / total, UTILIZATION_STEP)
        utilization = min(1.0, round(a.utilization + grow, 3))
        context = requests[a.worker_id].estimate.cuda_context.bytes
        new_claim = claim_bytes(utilization, total, context)
        result.append(m.Assignment(a.worker_id, a.model, a.node, a.gpus, utilization, new_claim,
                                   kept=False))
    return result


def _ledger_rows(gpus, others, reserve, holdings: Sequence[m.Holding],
                 after: Iterable[m.Assignment]) -> tuple[m.LedgerRow, ...]:
    before_by_gpu: dict[GpuKey, list[tuple[str, int]]] = {}
    for h in holdings:
        for index in h.gpus:
            before_by_gpu.setdefault((h.node, index), []).append((h.worker_id, h.claim_bytes))
    after_by_gpu: dict[GpuKey, list[tuple[str, int]]] = {}
    for a in after:
        for index in a.gpus:
            after_by_gpu.setdefault((a.node, index), []).append((a.worker_id, a.claim_bytes))
    rows = []
    for gpu in gpus:
        before = tuple(sorted(before_by_gpu.get(gpu.key, [])))
        after_list = tuple(sorted(after_by_gpu.get(gpu.key, [])))
        rows.append(m.LedgerRow(
            node=gpu.node, index=gpu.index, name=gpu.name, total_bytes=gpu.total_bytes,
            used_by_others_bytes=others.get(gpu.key, 0), reserve_bytes=reserve,
            claimed_before_bytes=sum(b for _, b in before),
            claimed_after_bytes=sum(b for _, b in after_list),
            workers_before=before, workers_after=after_list,
        ))
    return tuple(rows)
