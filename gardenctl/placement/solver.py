"""place(): give every wanted worker a node, GPUs and a --gpu-memory-utilization, or reasons.

Pure: values in, values out. The rules, in order:
1. Workers already running stay where they are when the garden still wants them unchanged
   (same sizing hash, GPUs still present, pins still satisfied). Their claims come first.
2. The others are placed highest priority first, then pinned ones (they have the fewest
   options), then multi-GPU workers, then largest first (best-fit decreasing); ties break by
   worker id, so the same input gives the same plan.
3. A GPU admits new workers only under the min-available threshold (`Pool.admits`: started
   smallest first, each must find at least that share of the GPU unclaimed), and only if the
   claim fits in what is left after others' use, our claims and the reserve: the solver never
   over-commits a GPU.
4. Which GPU: see placement.choose (fill the GPUs the garden already uses, best fit first;
   open the roomiest empty GPU only when none takes the worker; replicas apart).
5. A worker whose new version does not fit while its old version runs keeps the old one's place
   (reported as unplaced with `kept_previous`), so a bad edit never takes a model down.
6. Under the `fill` policy, the spare memory of each GPU is then shared among its new workers.
7. Standby workers (sleep mode) are booked asleep plus one wake slot per GPU and placed by
   placement.standby; level 1 also takes host RAM on its node.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence

from gardenctl.inventory.model import Gpu, Inventory
from gardenctl.placement import model as m
from gardenctl.placement.choose import STRATEGIES, choose, claims_by_size
from gardenctl.placement.ledger import GpuKey, Pool
from gardenctl.placement.reasons import reasons
from gardenctl.placement.standby import (
    booked_bytes,
    choose_standby,
    host_budget,
    host_reason,
    standby_of,
)
from gardenctl.placement.utilization import UTILIZATION_STEP, claim_bytes
from gardenctl.spec.models import PlacementPolicy
from gardenctl.units import floor_to


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
                                     holding.utilization, holding.claim_bytes, kept=True,
                                     asleep_bytes=standby_of(request, holding.claim_bytes)))
        elif all((holding.node, index) in present for index in holding.gpus):
            changed[holding.worker_id] = holding  # may stay where it is until the new one fits
        # else its GPUs are gone (a node that left the cluster): nothing of it can stay
    kept_ids = {a.worker_id for a in kept}
    pending = sorted((r for r in requests if r.worker_id not in kept_ids), key=placement_order)

    hosts = host_budget({n.name: n.host_memory_bytes for n in inventory.nodes},
                        policy.standby_host_fraction)
    held_back: dict[str, m.Holding] = {}
    while True:
        pool = Pool(gpus, others, policy.reserve, policy.min_available_gpu_fraction, hosts)
        for assignment in kept:
            _book(pool, assignment, by_id[assignment.worker_id], new=False)
        for holding in held_back.values():
            for index in holding.gpus:
                pool.add_claim((holding.node, index), holding.worker_id, holding.model,
                               holding.claim_bytes, new=False)
        rng = random.Random(seed)
        placed: list[m.Assignment] = []
        failed: list[m.Unplaced] = []
        hopeless: set[tuple[object, ...]] = set()
        explained: dict[tuple[object, ...], tuple[m.Reason, ...]] = {}  # since the last place
        for request in pending:
            if request.worker_id in held_back:
                failed.append(_unplaced_kept_previous(request, held_back[request.worker_id], pool,
                                                      policy))
                continue
            if request.standby:
                standby = choose_standby(request, pool, policy)
                if standby is None:
                    host = host_reason(request, pool)
                    failed.append(m.Unplaced(request.worker_id, request.model,
                                             (host,) if host else tuple(reasons(request, pool,
                                                                                policy))))
                    continue
                explained.clear()
                placed.append(m.Assignment(request.worker_id, request.model, standby.node,
                                           standby.gpus, standby.utilization, standby.claim,
                                           kept=False,
                                           asleep_bytes=standby_of(request, standby.claim)))
                _book(pool, placed[-1], request, new=True)
                continue
            # Claims only grow during a pass: a worker shaped like one that found no place
            # finds none either (thousands of identical models cost one search, not each).
            shape = _shape(request, pool, policy) if hopeless else None  # none failed: no cost
            choice = None if shape in hopeless else choose(request, pool, policy, strategy, rng)
            if choice is None:
                if shape is None and strategy == "best_fit":
                    shape = _shape(request, pool, policy)
                why = explained.get(shape) if shape is not None else None
                if why is None:
                    why = tuple(reasons(request, pool, policy))
                if shape is not None:
                    hopeless.add(shape)
                    explained[shape] = why
                failed.append(m.Unplaced(request.worker_id, request.model, why))
                continue
            explained.clear()  # the ledgers changed: reasons are worked out afresh
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


def placement_order(request: m.WorkerRequest) -> tuple[int, bool, int, int, str]:
    """Highest priority first; within a priority the most constrained first (pinned, then
    multi-GPU), then the largest (best-fit decreasing); ties by worker id."""
    pinned = request.pin_node is not None or request.pin_gpus is not None
    return (-request.priority, not pinned, -request.tensor_parallel_size,
            -request.estimate.total_bytes, request.worker_id)


def _shape(request: m.WorkerRequest, pool: Pool, policy: PlacementPolicy) -> tuple[object, ...]:
    """Everything that decides whether ``request`` fits somewhere in ``pool``: its claim on each
    GPU size, its parallelism and pins, and (only when its replicas must stay apart) its
    model."""
    claims = tuple(sorted(claims_by_size(request, pool, policy).items()))
    return (claims, request.tensor_parallel_size, request.pin_node, request.pin_gpus,
            request.model if request.spread else None)


def _may_stay(holding: m.Holding, request: m.WorkerRequest, present: set[GpuKey]) -> bool:
    if holding.sizing_hash != request.sizing_hash:
        return False
    if len(holding.gpus) != request.tensor_parallel_size:
        return False
    if any((holding.node, index) not in present for index in holding.gpus):
        return False
    if request.pin_node is not None and holding.node != request.pin_node:
        return False
    return request.pin_gpus is None or set(holding.gpus) <= set(request.pin_gpus)


def _book(pool: Pool, assignment: m.Assignment, request: m.WorkerRequest, *, new: bool) -> None:
    """Take an assignment's memory from the pool: its claim, or asleep + wake slot (standby),
    and a level-1 standby worker's weights from its node's host RAM."""
    for index in assignment.gpus:
        key = (assignment.node, index)
        if assignment.asleep_bytes is None:
            pool.add_claim(key, assignment.worker_id, assignment.model, assignment.claim_bytes,
                           new=new)
        else:
            pool.add_standby(key, assignment.worker_id, assignment.model,
                             assignment.claim_bytes, assignment.asleep_bytes, new=new)
    if assignment.asleep_bytes is not None:
        pool.take_host(assignment.node, request.host_bytes)


def _as_assignment(holding: m.Holding) -> m.Assignment:
    return m.Assignment(holding.worker_id, holding.model, holding.node, holding.gpus,
                        holding.utilization, holding.claim_bytes, kept=True)


def _unplaced_kept_previous(request: m.WorkerRequest, holding: m.Holding, pool: Pool,
                            policy: PlacementPolicy) -> m.Unplaced:
    why = tuple(reasons(request, pool, policy))
    note = m.Reason("kept_previous", f"the running version stays on {holding.node} GPU "
                    f"{','.join(map(str, holding.gpus))} until the new one fits",
                    node=holding.node)
    return m.Unplaced(request.worker_id, request.model, why + (note,), kept_previous=True)


def _fill(placed: list[m.Assignment], pool: Pool, requests: dict[str, m.WorkerRequest],
          policy: PlacementPolicy) -> list[m.Assignment]:
    """Share each GPU's spare memory among the new, auto-sized workers on it (more KV cache)."""
    growable = {a.worker_id for a in placed if requests[a.worker_id].utilization is None
                and not requests[a.worker_id].standby}  # standby: the slot is shared
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
        context = requests[a.worker_id].estimate.outside_budget_bytes
        new_claim = claim_bytes(utilization, total, context)
        result.append(m.Assignment(a.worker_id, a.model, a.node, a.gpus, utilization, new_claim,
                                   kept=False))
    return result


def _ledger_rows(gpus: Sequence[Gpu], others: Mapping[GpuKey, int], reserve: int,
                 holdings: Sequence[m.Holding],
                 after: Iterable[m.Assignment]) -> tuple[m.LedgerRow, ...]:
    before_by_gpu: dict[GpuKey, list[tuple[str, int]]] = {}
    booked_before: dict[GpuKey, list[tuple[int, int | None]]] = {}  # (awake, asleep)
    for h in holdings:
        for index in h.gpus:
            before_by_gpu.setdefault((h.node, index), []).append((h.worker_id, h.claim_bytes))
            booked_before.setdefault((h.node, index), []).append((h.claim_bytes,
                                                                  h.asleep_bytes))
    after_by_gpu: dict[GpuKey, list[tuple[str, int]]] = {}
    standby_by_gpu: dict[GpuKey, list[tuple[str, int, int]]] = {}
    booked_after: dict[GpuKey, list[tuple[int, int | None]]] = {}
    for a in after:
        for index in a.gpus:
            after_by_gpu.setdefault((a.node, index), []).append((a.worker_id, a.claim_bytes))
            booked_after.setdefault((a.node, index), []).append((a.claim_bytes, a.asleep_bytes))
            if a.asleep_bytes is not None:
                standby_by_gpu.setdefault((a.node, index), []).append(
                    (a.worker_id, a.claim_bytes, a.asleep_bytes))
    rows = []
    for gpu in gpus:
        before = tuple(sorted(before_by_gpu.get(gpu.key, [])))
        after_list = tuple(sorted(after_by_gpu.get(gpu.key, [])))
        standby = tuple(sorted(standby_by_gpu.get(gpu.key, [])))
        row = m.LedgerRow(
            node=gpu.node, index=gpu.index, name=gpu.name, total_bytes=gpu.total_bytes,
            used_by_others_bytes=others.get(gpu.key, 0), reserve_bytes=reserve,
            claimed_before_bytes=booked_bytes(booked_before.get(gpu.key, [])),
            claimed_after_bytes=booked_bytes(booked_after.get(gpu.key, [])),
            workers_before=before, workers_after=after_list, standby_after=standby,
        )
        rows.append(row)
    return tuple(rows)
