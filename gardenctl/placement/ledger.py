"""Per-GPU byte ledgers: total, used by processes that are not ours, claimed by our workers.

The admission rule is `accepts_new_worker`, one documented predicate; `Pool.admits` applies it
to the set of workers one plan adds to a GPU. Sorted indexes of free memory, per GPU size and
split into GPUs that already hold our workers and GPUs that do not, answer "which GPU of this
size has the least free memory that is still enough" in O(log n), so planning 10,000 workers
over 8,192 GPUs stays interactive.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import TypeVar

from gardenctl.inventory.model import Gpu

GpuKey = tuple[str, int]  # (node, index)
# an entry of a sorted index: (free, node, index), (free, index) or (group key, node)
_Entry = TypeVar("_Entry", tuple[int, str, int], tuple[int, int], tuple[int, str])


def accepts_new_worker(total: int, others: int, claimed: int,
                       min_available_fraction: float) -> bool:
    """A GPU takes a new worker only while the share of its total memory that is neither used
    by others nor claimed by our workers is at least `min_available_gpu_fraction` (0.3 by
    default, the ndif scheduler's threshold). Workers already running are never evicted by it.

    Whether the worker then fits is a separate question: its claim must not exceed the GPU's
    free memory (total - others - claimed - reserve)."""
    return (total - others - claimed) >= min_available_fraction * total


@dataclass
class GpuAccount:
    gpu: Gpu
    others: int
    claims: dict[str, int] = field(default_factory=dict)  # worker_id -> bytes
    models: dict[str, int] = field(default_factory=dict)  # model -> workers here
    kept: int = 0  # claims of workers that already run
    new_sum: int = 0  # claims of workers this plan adds
    new_max: int = 0
    wake: dict[str, int] = field(default_factory=dict)  # standby worker -> awake - asleep

    @property
    def wake_slot(self) -> int:
        """Memory kept free for waking standby workers: the largest (awake - asleep) here."""
        return max(self.wake.values(), default=0)

    def standby_cost(self, awake: int, asleep: int) -> int:
        """What one more standby worker takes from this GPU's free memory: its asleep bytes,
        and whatever its wake-up needs beyond the wake slot already kept here."""
        return asleep + max(0, awake - asleep - self.wake_slot)

    @property
    def claimed(self) -> int:
        return self.kept + self.new_sum


class Pool:
    """The GPUs being planned, with sorted indexes of free memory."""

    def __init__(self, gpus: list[Gpu], others: dict[GpuKey, int], reserve: int,
                 min_available_fraction: float,
                 host_free: dict[str, int] | None = None) -> None:
        self.reserve = reserve
        self.threshold = min_available_fraction
        # per node: host RAM level-1 sleeping workers may still take (absent: not checked)
        self.host_free: dict[str, int] = dict(host_free or {})
        self.accounts: dict[GpuKey, GpuAccount] = {}
        self.free: dict[GpuKey, int] = {}
        self.used: dict[int, list[tuple[int, str, int]]] = {}  # total -> [(free, node, index)]
        # The used GPUs split by what `admits` allows (see `admit_limit`): `open` ones take any
        # claim; a `saturated` one only claims up to its limit, kept as -limit first so that the
        # few that take a given claim come first (a fleet filled to the threshold is not walked
        # GPU by GPU for every worker).
        self.open: dict[int, list[tuple[int, str, int]]] = {}  # total -> [(free, node, index)]
        self.saturated: dict[int, list[tuple[int, int, str, int]]] = {}  # [(-limit, free, ..)]
        self.empty: dict[int, list[tuple[int, str, int]]] = {}
        self.by_node_size: dict[tuple[str, int], list[tuple[int, int]]] = {}  # -> [(free, idx)]
        for gpu in gpus:
            key = gpu.key
            self.accounts[key] = GpuAccount(gpu=gpu, others=others.get(key, 0))
            free = gpu.total_bytes - self.accounts[key].others - reserve
            self.free[key] = free
            self.used.setdefault(gpu.total_bytes, [])
            self.open.setdefault(gpu.total_bytes, [])
            self.saturated.setdefault(gpu.total_bytes, [])
            self.empty.setdefault(gpu.total_bytes, []).append((free, gpu.node, gpu.index))
            self.by_node_size.setdefault((gpu.node, gpu.total_bytes), []).append((free, gpu.index))
        for entries in self.empty.values():
            entries.sort()
        for node_entries in self.by_node_size.values():
            node_entries.sort()
        self.node_sizes = sorted(self.by_node_size)
        # (size, tp) -> sorted [(the node's tp-th largest free, node)], built on first use
        self._group_index: dict[tuple[int, int], list[tuple[int, str]]] = {}

    def group_index(self, total: int, tp: int) -> list[tuple[int, str]]:
        """Nodes with GPUs of ``total`` bytes, sorted by the free memory of their tp-th roomiest
        GPU: the nodes that can hold a tp-GPU worker claiming c are those at or after c."""
        index = self._group_index.get((total, tp))
        if index is None:
            index = sorted((self._group_key(node, total, tp), node)
                           for node, size in self.node_sizes if size == total)
            self._group_index[(total, tp)] = index
        return index

    def _group_key(self, node: str, total: int, tp: int) -> int:
        entries = self.by_node_size[(node, total)]
        return entries[-tp][0] if len(entries) >= tp else -(1 << 62)

    def admits(self, key: GpuKey, claim: int) -> bool:
        """THE admission rule. The workers one plan adds to a GPU are admitted if they could be
        added one by one, smallest first, each finding at least `min_available_gpu_fraction` of
        the GPU unclaimed (so the set less its largest claim must stay within that bound).
        Running workers count as claimed."""
        account = self.accounts[key]
        before_largest = account.kept + account.new_sum + claim - max(account.new_max, claim)
        return accepts_new_worker(account.gpu.total_bytes, account.others, before_largest,
                                  self.threshold)

    def admit_limit(self, key: GpuKey) -> int | None:
        """The largest claim `admits` accepts on this GPU; None: any claim. Exactly `admits`:
        a claim at least as large as the plan's largest new one here is admitted iff the
        unclaimed share already meets the threshold; a smaller one c iff
        unclaimed + new_max - c >= threshold x total."""
        account = self.accounts[key]
        total = account.gpu.total_bytes
        unclaimed = total - account.others - account.claimed
        floor = self.threshold * total
        if unclaimed >= floor:
            return None
        return min(account.new_max - 1, unclaimed + account.new_max - math.ceil(floor))

    def fits(self, key: GpuKey, claim: int) -> bool:
        return self.free[key] >= claim

    def holds_ours(self, key: GpuKey) -> bool:
        return bool(self.accounts[key].claims)

    def add_claim(self, key: GpuKey, worker_id: str, model: str, amount: int,
                  new: bool = True) -> None:
        account = self.accounts[key]
        old = self.free[key]
        new_free = old - amount
        total = account.gpu.total_bytes
        node, index = key
        if account.claims:
            _replace(self.used[total], (old, node, index), (new_free, node, index))
            self._unindex_used(key, old)
        else:
            self.empty[total].pop(bisect.bisect_left(self.empty[total], (old, node, index)))
            bisect.insort(self.used[total], (new_free, node, index))
        group_keys = {tp: self._group_key(node, total, tp)
                      for size, tp in self._group_index if size == total}
        _replace(self.by_node_size[(node, total)], (old, index), (new_free, index))
        for tp, before in group_keys.items():
            _replace(self._group_index[(total, tp)], (before, node),
                     (self._group_key(node, total, tp), node))
        self.free[key] = new_free
        account.claims[worker_id] = account.claims.get(worker_id, 0) + amount
        account.models[model] = account.models.get(model, 0) + 1
        if new:
            account.new_sum += amount
            account.new_max = max(account.new_max, amount)
        else:
            account.kept += amount
        self._index_used(key, new_free)

    def _index_used(self, key: GpuKey, free: int) -> None:
        node, index = key
        total = self.accounts[key].gpu.total_bytes
        limit = self.admit_limit(key)
        if limit is None:
            bisect.insort(self.open[total], (free, node, index))
        else:
            bisect.insort(self.saturated[total], (-limit, free, node, index))

    def _unindex_used(self, key: GpuKey, free: int) -> None:
        node, index = key
        total = self.accounts[key].gpu.total_bytes
        limit = self.admit_limit(key)
        if limit is None:
            entries = self.open[total]
            entries.pop(bisect.bisect_left(entries, (free, node, index)))
        else:
            saturated = self.saturated[total]
            saturated.pop(bisect.bisect_left(saturated, (-limit, free, node, index)))

    def add_standby(self, key: GpuKey, worker_id: str, model: str, awake: int, asleep: int,
                    new: bool = True) -> None:
        """Book a standby worker: asleep bytes plus its growth of the GPU's wake slot."""
        account = self.accounts[key]
        self.add_claim(key, worker_id, model, account.standby_cost(awake, asleep), new=new)
        account.wake[worker_id] = awake - asleep

    def take_host(self, node: str, amount: int) -> None:
        if amount and node in self.host_free:
            self.host_free[node] -= amount

    def most_free(self, count: int) -> list[GpuKey]:
        """The ``count`` GPUs with the most free memory (ties: lowest node, index)."""
        tails = []
        for lists in (self.used, self.empty):
            for entries in lists.values():
                tails += entries[-count:]
        tails.sort(key=lambda e: (-e[0], e[1], e[2]))
        return [(node, index) for _, node, index in tails[:count]]


def _replace(entries: list[_Entry], old: _Entry, new: _Entry) -> None:
    entries.pop(bisect.bisect_left(entries, old))
    bisect.insort(entries, new)
