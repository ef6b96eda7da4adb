"""Which GPU(s) one worker goes to, given the ledgers so far (pure).

gardenctl's policy ("best_fit") fills GPUs that already hold the garden's workers before opening
another, so the garden uses few GPUs (within one GPU of the optimum on 97.8% of the benchmark's
fleets, benchmarks/RESULTS.md):
1. among GPUs that already hold our workers and none of this model's replicas: the one it fills
   best (least free memory left);
2. else such a GPU that holds a replica of the same model (no GPU is opened only to keep
   replicas apart: that cost the benchmark 12 points; `spread_replicas: true` asks for it);
3. else the empty GPU with the most free memory (it can take the most workers after this one).
Tensor-parallel workers take GPUs of one size on one node: the set with the most GPUs that
already hold our workers, filled best; among fresh GPUs, the roomiest set.

The other strategies reproduce the seed projects' policies for benchmarks: ndif's "most free",
"first fit" and "random" (single-GPU workers only; groups always use the rule above).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

from gardenctl.placement import model as m
from gardenctl.placement.ledger import GpuKey, Pool
from gardenctl.placement.utilization import claim_bytes, fit_utilization, tiered_utilization
from gardenctl.spec.models import PlacementPolicy

STRATEGIES = ("best_fit", "most_free", "first_fit", "random")
GROUP_CANDIDATES = 64  # nodes compared for one tensor-parallel worker

# a single-GPU candidate, smallest best: (leftover or -free, node, index, GPU total)
_Slot = tuple[int, str, int, int]
# a tensor-parallel candidate, smallest best: (-GPUs of ours used, leftover, node, indexes, total)
_GroupSlot = tuple[int, int, str, tuple[int, ...], int]


@dataclass(frozen=True)
class Choice:
    node: str
    gpus: tuple[int, ...]
    utilization: float
    claim: int


def utilization_for(request: m.WorkerRequest, total: int, policy: PlacementPolicy) -> float:
    """F for this worker on a GPU of ``total`` bytes (may exceed 1: it then cannot go there)."""
    if request.utilization is not None:
        return request.utilization
    if policy.utilization_policy == "tiered":
        return tiered_utilization(request.estimate, total)
    return fit_utilization(request.estimate, total, policy.safety_margin)


def claims_by_size(request: m.WorkerRequest, pool: Pool,
                   policy: PlacementPolicy) -> dict[int, tuple[float, int]]:
    """(F, claim bytes) on each GPU size of the pool where the worker can fit at all."""
    claims = {}
    for total in pool.used:
        utilization = utilization_for(request, total, policy)
        if utilization <= 1.0:
            claims[total] = (utilization, claim_bytes(utilization, total,
                                                      request.estimate.outside_budget_bytes))
    return claims


def candidate_keys(request: m.WorkerRequest, pool: Pool) -> list[GpuKey]:
    keys = sorted(pool.accounts)
    if request.pin_node is not None:
        keys = [k for k in keys if k[0] == request.pin_node]
    if request.pin_gpus is not None:
        keys = [k for k in keys if k[1] in request.pin_gpus]
    return keys


def choose(request: m.WorkerRequest, pool: Pool, policy: PlacementPolicy, strategy: str,
           rng: random.Random) -> Choice | None:
    claims = claims_by_size(request, pool, policy)
    if not claims:
        return None
    pinned = request.pin_node is not None or request.pin_gpus is not None
    if request.tensor_parallel_size > 1:
        return _group(request, pool, claims)
    if strategy == "best_fit" and not pinned:
        return _fill_first(request, pool, claims)
    return _scan(request, pool, claims, strategy, rng)


def _fill_first(request: m.WorkerRequest, pool: Pool,
                claims: dict[int, tuple[float, int]]) -> Choice | None:
    best: _Slot | None = None  # (leftover, node, index, total)
    shared: _Slot | None = None
    for total, (_, claim) in claims.items():
        entries = pool.open[total]  # they admit any claim (Pool.admit_limit)
        for free, node, index in entries[bisect.bisect_left(entries, (claim, "", -1)):]:
            candidate = (free - claim, node, index, total)
            if pool.accounts[(node, index)].models.get(request.model, 0):
                if not request.spread and (shared is None or candidate < shared):
                    shared = candidate
                continue
            if best is None or candidate < best:
                best = candidate
            break  # sorted by free memory: the first one fills best
        for negative_limit, free, node, index in pool.saturated[total]:
            if -negative_limit < claim:
                break  # the rest admit even less
            if free < claim:
                continue
            candidate = (free - claim, node, index, total)
            if pool.accounts[(node, index)].models.get(request.model, 0):
                if not request.spread and (shared is None or candidate < shared):
                    shared = candidate
            elif best is None or candidate < best:
                best = candidate
    if best is None:
        best = shared
    if best is None:
        best = _roomiest_empty(pool, claims)
    if best is None:
        return None
    _, node, index, total = best
    utilization, claim = claims[total]
    return Choice(node, (index,), utilization, claim)


def _roomiest_empty(pool: Pool, claims: dict[int, tuple[float, int]]) -> _Slot | None:
    """The empty GPU with the most free memory that takes the worker (ties: lowest node,
    index), as (leftover, node, index, total)."""
    best: _Slot | None = None  # (-free, node, index, total)
    for total, (_, claim) in claims.items():
        entries = pool.empty[total]
        end = len(entries)
        while end and entries[end - 1][0] >= claim:
            free = entries[end - 1][0]
            start = bisect.bisect_left(entries, (free, "", -1))  # the GPUs with this much free
            found = next(((node, index) for _, node, index in entries[start:end]
                          if pool.admits((node, index), claim)), None)
            if found is not None:
                candidate = (-free, found[0], found[1], total)
                if best is None or candidate < best:
                    best = candidate
                break
            end = start
    if best is None:
        return None
    negative_free, node, index, total = best
    return (-negative_free - claims[total][1], node, index, total)


def _scan(request: m.WorkerRequest, pool: Pool, claims: dict[int, tuple[float, int]],
          strategy: str, rng: random.Random) -> Choice | None:
    fits = []
    for key in candidate_keys(request, pool):
        total = pool.accounts[key].gpu.total_bytes
        if total not in claims:
            continue
        claim = claims[total][1]
        if pool.fits(key, claim) and pool.admits(key, claim) and not _kept_apart(request, pool,
                                                                                 key):
            fits.append((key, claims[total]))
    if not fits:
        return None
    if strategy == "random":
        key, (utilization, claim) = rng.choice(fits)
    elif strategy == "first_fit":
        key, (utilization, claim) = fits[0]
    elif strategy == "most_free":
        key, (utilization, claim) = min(fits, key=lambda f: (-pool.free[f[0]], f[0]))
    else:  # best fit among pinned GPUs: ours first, replicas apart, least free left
        key, (utilization, claim) = min(
            fits, key=lambda f: (pool.accounts[f[0]].models.get(request.model, 0) > 0,
                                 not pool.holds_ours(f[0]), pool.free[f[0]] - f[1][1], f[0]))
    return Choice(key[0], (key[1],), utilization, claim)


def _kept_apart(request: m.WorkerRequest, pool: Pool, key: GpuKey) -> bool:
    """True when spread_replicas forbids this GPU: it holds a replica of the same model."""
    return request.spread and pool.accounts[key].models.get(request.model, 0) > 0


def _group(request: m.WorkerRequest, pool: Pool,
           claims: dict[int, tuple[float, int]]) -> Choice | None:
    """Tensor parallelism: ``tp`` GPUs of one size on one node.

    Nodes are visited tightest first (by their tp-th roomiest GPU), where the GPUs we already
    use tend to be; the best of the first GROUP_CANDIDATES nodes that can take the worker wins,
    which keeps planning 10,000 workers interactive."""
    tp = request.tensor_parallel_size
    allowed = None if request.pin_gpus is None else set(request.pin_gpus)
    best: _GroupSlot | None = None
    for total, (_, claim) in sorted(claims.items()):
        if request.pin_node is not None:
            nodes = [request.pin_node] if (request.pin_node, total) in pool.by_node_size else []
        else:
            index = pool.group_index(total, tp)
            nodes = [node for _, node in index[bisect.bisect_left(index, (claim, "")):]]
        found = 0
        for node in nodes:
            candidate = _group_on(request, pool, node, total, claim, tp, allowed)
            if candidate is None:
                continue
            found += 1
            if best is None or candidate < best:
                best = candidate
            if found >= GROUP_CANDIDATES:
                break
    if best is None:
        return None
    _, _, node, indexes, total = best
    utilization, claim = claims[total]
    return Choice(node, indexes, utilization, claim)


def _group_on(request: m.WorkerRequest, pool: Pool, node: str, total: int, claim: int, tp: int,
              allowed: set[int] | None) -> _GroupSlot | None:
    """The best tp GPUs of one node for the worker: ours first (best fit), then fresh ones."""
    entries = pool.by_node_size[(node, total)]
    if len(entries) < tp or entries[-tp][0] < claim:
        return None
    ours: list[tuple[int, int]] = []  # (leftover, index)
    fresh: list[tuple[int, int]] = []
    for free, index in entries[bisect.bisect_left(entries, (claim, -1)):]:
        key = (node, index)
        if (allowed is not None and index not in allowed) or not pool.admits(key, claim) \
                or _kept_apart(request, pool, key):
            continue
        (ours if pool.holds_ours(key) else fresh).append((free - claim, index))
    if len(ours) + len(fresh) < tp:
        return None
    chosen = ours[:tp] + fresh[:max(0, tp - len(ours))]
    leftover = sum(left for left, _ in chosen)
    used = min(tp, len(ours))
    # fill GPUs we already use, best fit; on fresh GPUs take the roomiest (like one GPU)
    return (-used, leftover if used else -leftover, node,
            tuple(sorted(index for _, index in chosen)), total)
