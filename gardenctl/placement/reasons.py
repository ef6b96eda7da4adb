"""Why a worker could not be placed: structured reasons, requested vs free per GPU tried."""

from __future__ import annotations

from collections.abc import Iterable

from gardenctl.placement import model as m
from gardenctl.placement.choose import candidate_keys, utilization_for
from gardenctl.placement.ledger import GpuKey, Pool
from gardenctl.placement.utilization import claim_bytes
from gardenctl.spec.models import PlacementPolicy
from gardenctl.units import format_size

MAX_REASONS = 4


def reasons(request: m.WorkerRequest, pool: Pool, policy: PlacementPolicy) -> Iterable[m.Reason]:
    """The most promising GPUs (most free memory) and why each could not take the worker."""
    if not pool.accounts:
        yield m.Reason(m.NO_GPUS, "the inventory has no GPUs")
        return
    if request.pin_node is not None and not any(k[0] == request.pin_node for k in pool.accounts):
        yield m.Reason(m.PINNED_NODE_MISSING,
                       f"pinned to node {request.pin_node!r}, which is not in the inventory",
                       node=request.pin_node)
        return
    pinned = request.pin_node is not None or request.pin_gpus is not None
    if request.pin_gpus is not None:
        nodes = {request.pin_node} if request.pin_node else {k[0] for k in pool.accounts}
        for node in sorted(n for n in nodes if n is not None):
            present = {k[1] for k in pool.accounts if k[0] == node}
            missing = sorted(set(request.pin_gpus) - present)
            if missing:
                yield m.Reason(m.PINNED_GPU_MISSING,
                               f"pinned GPU(s) {', '.join(map(str, missing))} do not exist on "
                               f"{node}", node=node)
    tp = request.tensor_parallel_size
    if tp > 1:
        per_node: dict[str, int] = {}
        for node, _ in (candidate_keys(request, pool) if pinned else pool.accounts):
            per_node[node] = per_node.get(node, 0) + 1
        largest = max(per_node.values(), default=0)
        if largest < tp:
            yield m.Reason(m.NOT_ENOUGH_GPUS,
                           f"needs {tp} GPUs on one node; the largest node has {largest}")
            return
    if pinned:
        keys = candidate_keys(request, pool)
        ranked = sorted(keys, key=lambda k: (-pool.free[k], k))
        tried = len(keys)
    else:
        ranked = pool.most_free(MAX_REASONS)
        tried = len(pool.accounts)
    for key in ranked[:MAX_REASONS]:
        yield _gpu_reason(request, pool, policy, key)
    if tried > MAX_REASONS:
        yield m.Reason(m.MORE_GPUS, f"{tried - MAX_REASONS} more GPU(s) with less free memory "
                       "were tried")
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
    claim = claim_bytes(utilization, total, request.estimate.outside_budget_bytes)
    if request.spread and account.models.get(request.model, 0):
        return m.Reason(m.REPLICAS_APART,
                        f"{label}: holds a replica of {request.model} (spread_replicas)",
                        node=key[0], gpu=key[1], requested_bytes=claim, free_bytes=free,
                        total_bytes=total)
    asleep = request.asleep_bytes
    if asleep is not None:  # standby: booked asleep, plus what it widens the wake slot by
        return _standby_reason(pool, policy, key, claim, min(asleep, claim))
    if free >= claim and not pool.admits(key, claim):
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


def _standby_reason(pool: Pool, policy: PlacementPolicy, key: GpuKey, claim: int,
                    asleep: int) -> m.Reason:
    account = pool.accounts[key]
    total, free, label = account.gpu.total_bytes, pool.free[key], account.gpu.label
    cost = account.standby_cost(claim, asleep)
    if free >= cost and cost > asleep and not pool.admits(key, cost):
        unclaimed = (total - account.others - account.claimed) / total
        return m.Reason(m.BELOW_MIN_AVAILABLE,
                        f"{label}: only {unclaimed:.0%} of it is unclaimed, below "
                        f"min_available_gpu_fraction {policy.min_available_gpu_fraction:.0%} "
                        f"(its wake-up would widen the GPU's wake slot by "
                        f"{format_size(cost - asleep)})", node=key[0], gpu=key[1],
                        requested_bytes=cost, free_bytes=free, total_bytes=total)
    widen = f" + {format_size(cost - asleep)} more wake slot" if cost > asleep else ""
    return m.Reason(m.INSUFFICIENT_MEMORY,
                    f"{label}: needs {format_size(cost)} ({format_size(asleep)} asleep{widen}; "
                    f"{format_size(claim)} awake), {format_size(max(free, 0))} free",
                    node=key[0], gpu=key[1], requested_bytes=cost, free_bytes=free,
                    total_bytes=total)
