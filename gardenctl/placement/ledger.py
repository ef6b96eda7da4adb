"""Per-GPU byte ledgers: total, used by processes that are not ours, claimed by our workers.

The one admission rule for a new worker on a GPU is `accepts_new_worker`; the index kept here
answers "which GPU of this size has the least free memory that is still enough" in O(log n), so
planning 10,000 workers over 8,192 GPUs stays interactive.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from gardenctl.inventory.model import Gpu

GpuKey = tuple[str, int]  # (node, index)


def accepts_new_worker(total: int, others: int, claimed: int, min_available_fraction: float) -> bool:
    """THE admission predicate: a GPU takes a new worker only while the share of its total
    memory that is neither used by others nor claimed by our workers is at least
    `min_available_gpu_fraction` (0.3 by default, the ndif scheduler's threshold).

    Whether the worker then fits is a separate question: its claim must not exceed the
    GPU's free memory (total - others - claimed - reserve). Workers already running are never
    evicted by this rule."""
    return (total - others - claimed) >= min_available_fraction * total


@dataclass
class GpuAccount:
    gpu: Gpu
    others: int
    claims: dict[str, int] = field(default_factory=dict)  # worker_id -> bytes
    models: dict[str, int] = field(default_factory=dict)  # model -> workers here

    @property
    def claimed(self) -> int:
        return sum(self.claims.values())


class Pool:
    """The GPUs being planned, with a sorted index of free memory per GPU size."""

    def __init__(self, gpus: list[Gpu], others: dict[GpuKey, int], reserve: int,
                 min_available_fraction: float) -> None:
        self.reserve = reserve
        self.threshold = min_available_fraction
        self.accounts: dict[GpuKey, GpuAccount] = {}
        self.free: dict[GpuKey, int] = {}
        self.by_size: dict[int, list[tuple[int, str, int]]] = {}  # total -> [(free, node, idx)]
        self.by_node_size: dict[tuple[str, int], list[tuple[int, int]]] = {}  # -> [(free, idx)]
        for gpu in gpus:
            key = gpu.key
            self.accounts[key] = GpuAccount(gpu=gpu, others=others.get(key, 0))
            free = gpu.total_bytes - self.accounts[key].others - reserve
            self.free[key] = free
            self.by_size.setdefault(gpu.total_bytes, []).append((free, gpu.node, gpu.index))
            self.by_node_size.setdefault((gpu.node, gpu.total_bytes), []).append((free, gpu.index))
        for entries in self.by_size.values():
            entries.sort()
        for entries in self.by_node_size.values():
            entries.sort()

    def min_free_for(self, total: int, claim: int) -> int:
        """Free bytes a GPU of this size needs to take a worker claiming ``claim``:
        enough room, and admission under the min-available threshold."""
        admission = math.ceil(self.threshold * total) - self.reserve
        return max(claim, admission)

    def admits(self, key: GpuKey) -> bool:
        account = self.accounts[key]
        return accepts_new_worker(account.gpu.total_bytes, account.others, account.claimed,
                                  self.threshold)

    def add_claim(self, key: GpuKey, worker_id: str, model: str, amount: int) -> None:
        account = self.accounts[key]
        old = self.free[key]
        new = old - amount
        total = account.gpu.total_bytes
        _replace(self.by_size[total], (old, key[0], key[1]), (new, key[0], key[1]))
        _replace(self.by_node_size[(key[0], total)], (old, key[1]), (new, key[1]))
        self.free[key] = new
        account.claims[worker_id] = account.claims.get(worker_id, 0) + amount
        account.models[model] = account.models.get(model, 0) + 1


def _replace(entries: list, old: tuple, new: tuple) -> None:
    entries.pop(bisect.bisect_left(entries, old))
    bisect.insort(entries, new)
