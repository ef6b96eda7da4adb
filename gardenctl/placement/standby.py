"""Where a standby worker goes (pure): GPUs shared by models that sleep until a request comes.

A standby worker (`standby: sleep`) is awake only while the gateway serves it. On its GPU the
plan books what it keeps while asleep (vLLM's sleep mode leaves the CUDA context, non-torch
memory and the CUDA-graph pool there: docs/vllm.md section 11) and, once per GPU, a *wake slot*:
the largest (awake - asleep) of the standby workers there. So every standby worker can be woken
while all the others sleep, and the gateway may keep awake at once any set whose
(awake - asleep) sum fits in the slot (gardenctl.gateway.standby decides which, and puts idle
ones to sleep first). A worker starts awake, so it is started only while the others on its GPUs
sleep (the executor puts them to sleep first).

Choice, among the GPUs the worker may use (pins, one size and one node for tensor
parallelism, replicas apart when asked): the smallest cost first (a GPU whose wake slot already
covers the worker costs only its asleep bytes, so standby models gather where a slot exists),
then GPUs that hold our workers, filled best, then the roomiest empty one. The min-available
threshold (placement.min_available_gpu_fraction) applies when a worker grows a GPU's awake
memory (opens or widens its wake slot), not when it joins a slot that already covers it: a GPU
full of sleeping models is the point. Level 1 keeps the
weights in host RAM while asleep: the node must have that much left of its standby share
(`placement.standby_host_fraction`). A few hundred standby workers are scanned GPU by GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from gardenctl.placement import model as m
from gardenctl.placement.choose import Choice, candidate_keys, claims_by_size
from gardenctl.placement.ledger import GpuKey, Pool
from gardenctl.spec.models import PlacementPolicy
from gardenctl.units import format_size

# one GPU's candidacy, smallest best: (cost, not ours, leftover or -free, index)
_Rank = tuple[int, bool, int, int]


def choose_standby(request: m.WorkerRequest, pool: Pool,
                   policy: PlacementPolicy) -> Choice | None:
    asleep = request.asleep_bytes
    assert asleep is not None, "only standby workers are placed here"
    claims = claims_by_size(request, pool, policy)
    best: tuple[int, bool, int, str, tuple[int, ...], int] | None = None
    for (node, total), ranks in _candidates(request, pool, claims, asleep):
        if len(ranks) < request.tensor_parallel_size:
            continue
        chosen = sorted(ranks)[:request.tensor_parallel_size]
        candidate = (sum(r[0] for r in chosen), any(r[1] for r in chosen),
                     sum(r[2] for r in chosen), node, tuple(sorted(r[3] for r in chosen)), total)
        if best is None or candidate < best:
            best = candidate
    if best is None:
        return None
    _, _, _, node, indexes, total = best
    utilization, claim = claims[total]
    return Choice(node, indexes, utilization, claim)


def _candidates(request: m.WorkerRequest, pool: Pool, claims: dict[int, tuple[float, int]],
                asleep: int) -> Iterator[tuple[tuple[str, int], list[_Rank]]]:
    """Per (node, GPU size): the GPUs that can take the worker, ranked."""
    groups: dict[tuple[str, int], list[_Rank]] = {}
    for key in candidate_keys(request, pool):
        if not _host_fits(request, pool, key[0]):
            continue
        account = pool.accounts[key]
        total = account.gpu.total_bytes
        if total not in claims or (request.spread and account.models.get(request.model, 0)):
            continue
        awake = claims[total][1]
        cost = account.standby_cost(awake, min(asleep, awake))
        if not pool.fits(key, cost) or (cost > asleep and not pool.admits(key, cost)):
            continue  # the min-available threshold guards awake memory: a slot that covers
            # the worker already is that memory, so joining it is not held to the threshold
        ours = pool.holds_ours(key)
        leftover = pool.free[key] - cost
        groups.setdefault((key[0], total), []).append(
            (cost, not ours, leftover if ours else -pool.free[key], key[1]))
    yield from sorted(groups.items())


def _host_fits(request: m.WorkerRequest, pool: Pool, node: str) -> bool:
    left = pool.host_free.get(node)
    return left is None or request.host_bytes <= left


def host_reason(request: m.WorkerRequest, pool: Pool) -> m.Reason | None:
    """Why no node's host RAM takes a level-1 worker, when that is what stopped it."""
    if not request.host_bytes:
        return None
    nodes = sorted({key[0] for key in candidate_keys(request, pool)})
    short = [n for n in nodes if not _host_fits(request, pool, n)]
    if not short or len(short) < len(nodes):
        return None
    shown = ", ".join(f"{n} has {format_size(max(pool.host_free[n], 0))} left"
                      for n in short[:3])
    return m.Reason(m.HOST_MEMORY, f"asleep at level 1 its weights take "
                    f"{format_size(request.host_bytes)} of host RAM; {shown} of its share for "
                    "sleeping workers (placement.standby_host_fraction); use standby level 2, "
                    "or raise the share", node=short[0], requested_bytes=request.host_bytes)


def standby_of(request: m.WorkerRequest, choice_claim: int) -> int | None:
    """The asleep bytes an assignment records (never more than its awake claim)."""
    asleep = request.asleep_bytes
    return None if asleep is None else min(asleep, choice_claim)


def booked_bytes(claims: Iterable[tuple[int, int | None]]) -> int:
    """What a GPU's workers book, given (awake claim, asleep bytes or None) each: always-awake
    claims, plus standby workers asleep, plus one wake slot (their largest awake - asleep)."""
    total, slot = 0, 0
    for awake, asleep in claims:
        if asleep is None:
            total += awake
        else:
            total += asleep
            slot = max(slot, awake - asleep)
    return total + slot


def host_budget(nodes: dict[str, int | None], fraction: float) -> dict[str, int]:
    """Host RAM per node that level-1 sleeping workers may take (nodes of unknown RAM: none
    listed, so not checked)."""
    return {name: int(total * fraction) for name, total in sorted(nodes.items())
            if total is not None}


__all__ = ["GpuKey", "booked_bytes", "choose_standby", "host_budget", "host_reason", "standby_of"]
