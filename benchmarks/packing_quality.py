"""Packing quality: GPUs used (and workers left out) by gardenctl's best fit, against the optimum
and against the seed projects' placement policies, on random realistic fleets.

    .venv/bin/python benchmarks/packing_quality.py [--instances N] [--seed S] [--time-limit T]
    .venv/bin/python benchmarks/packing_quality.py --full       # + in-order, apart, memory optima
    .venv/bin/python benchmarks/packing_quality.py --show SEED  # one instance in detail

Needs scipy (`pip install scipy`, or the `bench` extra): the optimum comes from an exact MILP
(scipy.optimize.milp, HiGHS). Instances run in parallel, one process per core; 300 instances
take about 3 minutes on 2 cores (--full: about 11).

Instances (seeded; instance k uses seed S + k). Each is a small fleet of 8-16 GPUs in nodes of
2, 4 or 8 GPUs, of one GPU type or two (H100 80GB, A100 40GB, L40S 48GB, A10G, L4; on a GPU with
probability 0.2, other processes already use 1-12 GiB), and 8-30 workers: replicas of models drawn
from benchmarks/fleets.py (public catalog models, 0.6B-72B, some quantized, max_model_len 2k-32k,
min_concurrency 1-8, TP 1-8 chosen to fit the fleet's largest GPU). Every worker's claim is
gardenctl's own: the estimate, the `fit` utilization policy (5% safety margin, F rounded up to
0.001 of the GPU), `ceil(F x total) + CUDA context`. Placement policy: gardenctl's defaults
(min_available_gpu_fraction 0.3, reserve 512 MiB). Even seeds are "roomy" instances (the
workers' memory is 25-70% of the fleet's), odd seeds "tight" ones (100-150%: some workers cannot
be placed).

Policies, all run by gardenctl's own solver on the same requests and fleet (`place(...,
strategy=...)`), so the constraints are identical and only the choice of GPU differs:
- best_fit   gardenctl (placement/choose.py): fill the GPUs the garden already uses, best fit
             first (replicas apart among them when possible), open the roomiest empty GPU only
             when none takes the worker;
- most_free  ndif's scheduler: the GPU with the most free memory;
- first_fit  the first GPU (node, index order) where the worker fits;
- random     a uniformly random GPU among those where it fits (seeded);
- best_fit*  (an ablation, not a policy) best fit with every replica renamed into its own
             model, so that it does not spread replicas over different GPUs.
All place in the same order (priority, pinned, then TP workers, then largest first) and put TP
workers the same way: the seed policies differ from best fit only for single-GPU workers.

The optimum (an exact MILP over the same claims) models:
- x[w,g] = 1 when worker w uses GPU g; a worker uses tp GPUs of one node and one GPU size, or
  none (then it is unplaced);
- capacity: on every GPU, the claims placed there <= total - used by others - reserve;
- the admission rule (min_available_gpu_fraction): gardenctl admits a worker on a GPU only while
  that GPU's unclaimed memory (total - others - claimed) is at least ceil(0.3 x total). A set of
  workers can be admitted in some order iff the set minus its largest claim fits under
  total - others - ceil(0.3 x total) (add the largest last); the MILP has this exactly, with a
  binary "admitted last" variable per worker and GPU;
- objective, lexicographic: first the most workers placed, then the fewest GPUs used.
It does NOT model the preference of replicas for different GPUs (a soft preference in gardenctl,
not a constraint) nor the placement order: the optimum may put two replicas of a model on one
GPU, and it may place workers in any order. --full adds three variants that close these gaps:
"in order" (workers admitted in gardenctl's placement order: only the last one placed on a GPU
may take it past the threshold), "apart" (replicas of a model never share a GPU: a hard
constraint) and "memory" (the most memory placed, instead of the most workers). With the
admission rule off (section D) the same MILP runs with threshold 0. Identical GPUs of a node are
interchangeable (a symmetry-breaking constraint says so). Claims are exact bytes (expressed in
MiB, exact binary fractions). Every MILP solution is re-checked in integer bytes, and a policy's
own result is passed to the MILP as a bound (so a MILP that missed a placement a policy found
would fail loudly). Each solve has a time limit (--time-limit); an instance the MILP did not
prove optimal is compared with the MILP's bound (a lower bound of GPUs, an upper bound of workers
placed), which can only make the policies look worse; such solves are counted, and they make the
figures vary a little with the machine's speed and load.

Reported, per policy:
A. on instances where the optimum places every worker: how often the policy places every worker
   too and uses at most one GPU more than the optimum (THE TARGET: 95% of instances for
   best_fit), extra GPUs (mean, max, total);
B. on every instance: workers left unplaced, against the fewest possible, and their memory;
C. head to head: instances where best fit does worse / better than each seed policy;
D. the same as A with the admission rule off;
E. A's share by kind of fleet (one or two GPU sizes, with or without TP workers).

Exit status 1 if best fit is within one GPU of the optimum on fewer than 95% of the instances
where the optimum places every worker.
"""


from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleets

from gardenctl.inventory.model import Gpu, Inventory, Node
from gardenctl.placement import WorkerRequest, place
from gardenctl.placement.choose import utilization_for
from gardenctl.placement.solver import placement_order as solver_order
from gardenctl.placement.utilization import claim_bytes
from gardenctl.spec.models import PlacementPolicy
from gardenctl.units import GiB, MiB

POLICIES = ("best_fit", "most_free", "first_fit", "random")
SEED_POLICIES = POLICIES[1:]
TARGET_WITHIN_ONE = 0.95
GPU_CHOICES = ("H100", "A100-40", "L40S", "A10G", "L4")


@dataclass(frozen=True)
class Instance:
    seed: int
    regime: str  # roomy | tight
    inventory: Inventory
    requests: tuple[WorkerRequest, ...]
    demand_share: float  # workers' memory / fleet's memory

    @property
    def gpus(self) -> tuple[Gpu, ...]:
        return self.inventory.gpus


# --- instances ---------------------------------------------------------------------------------

def _random_nodes(rng: random.Random) -> list[tuple[str, int, int]]:
    """[(gpu type, gpus per node, nodes)]: 8-16 GPUs, one or two GPU types."""
    while True:
        kinds = rng.sample(GPU_CHOICES, rng.choice((1, 2)))
        layout = []
        for kind in kinds:
            per_node = rng.choice((2, 4, 4, 8, 8))
            layout.append((kind, per_node, rng.randint(1, max(1, 16 // per_node // len(kinds)))))
        total = sum(per * count for _, per, count in layout)
        if 8 <= total <= 16:
            return layout


def _others(rng: random.Random) -> int:
    if rng.random() >= 0.2:
        return 0
    return int(rng.choice((1, 2, 2, 4, 4, 6, 8, 12)) * GiB)


def make_instance(seed: int, policy: PlacementPolicy) -> Instance:
    rng = random.Random(seed)
    regime = "roomy" if seed % 2 == 0 else "tight"
    low, high = (0.25, 0.7) if regime == "roomy" else (1.0, 1.5)
    while True:
        layout = _random_nodes(rng)
        nodes = []
        for kind, per_node, count in layout:
            gpu_type = fleets.GPU_TYPES[kind]
            for _ in range(count):
                name = f"{kind.lower()}-{len(nodes)}"
                gpus = tuple(Gpu(node=name, index=i, name=gpu_type.name,
                                 total_bytes=int(gpu_type.memory_gib * GiB),
                                 used_bytes=_others(rng)) for i in range(per_node))
                nodes.append(Node(name=name, gpus=gpus))
        inventory = Inventory(nodes=tuple(nodes), source="benchmark")
        capacity = sum(g.total_bytes - g.used_bytes for g in inventory.gpus)
        largest = max(fleets.GPU_TYPES[k].memory_gib for k, _, _ in layout)
        widest = max(per for k, per, _ in layout
                     if fleets.GPU_TYPES[k].memory_gib == largest)
        share = rng.uniform(low, high)
        requests: list[WorkerRequest] = []
        demand = 0
        number = 0
        while demand < share * capacity and len(requests) < 30:
            entry = fleets.random_model(rng, number, largest, widest)
            number += 1
            estimate = entry.estimate
            for replica in range(min(entry.replicas, 30 - len(requests))):
                requests.append(WorkerRequest(
                    worker_id=f"bench/{entry.name}/{replica}", model=entry.name, replica=replica,
                    tensor_parallel_size=entry.tensor_parallel_size, priority=0,
                    estimate=estimate, sizing_hash=""))
                demand += estimate.total_bytes * entry.tensor_parallel_size
        if len(requests) >= 8 and low * capacity <= demand <= high * capacity * 1.1:
            return Instance(seed, regime, inventory, tuple(requests), demand / capacity)


# --- the policies ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    placed: int
    unplaced: int
    gpus_used: int
    seconds: float
    where: dict  # worker_id -> (node, gpus)
    unplaced_gib: float  # the left-out workers' estimates, total x TP


def placement_order(request: WorkerRequest) -> tuple:
    """gardenctl's placement order (priority, pinned, TP, size, id): the solver's own key, so
    that the in-order optimum cannot drift from what the policies do."""
    return solver_order(request)


def run_policy(instance: Instance, policy: PlacementPolicy, strategy: str) -> Outcome:
    start = time.perf_counter()
    result = place(instance.requests, instance.inventory, policy, strategy=strategy,
                   seed=instance.seed)
    elapsed = time.perf_counter() - start
    used = sum(1 for row in result.ledgers if row.workers_after)
    for row in result.ledgers:
        assert not row.overcommitted, f"{strategy} over-committed {row.node} GPU {row.index}"
    left = {u.worker_id for u in result.unplaced}
    return Outcome(len(result.assignments), len(result.unplaced), used, elapsed,
                   {a.worker_id: (a.node, a.gpus) for a in result.assignments},
                   _memory([r for r in instance.requests if r.worker_id in left]))


# --- the exact optimum -------------------------------------------------------------------------

@dataclass(frozen=True)
class Optimum:
    placed: int  # proven, or the MILP's upper bound when not proven
    gpus_used: int | None  # when every worker is placed: proven, or the MILP's lower bound
    proven: bool
    seconds: float
    where: dict


class Model:
    """The MILP of one instance (see the module docstring for what it models)."""

    def __init__(self, instance: Instance, policy: PlacementPolicy, *,
                 in_order: bool = False, apart: bool = False) -> None:
        """in_order False: workers may be admitted in any order (the true optimum). True: in
        gardenctl's placement order (priority, TP, size, id), as every policy here places.
        apart: replicas of one model never share a GPU (gardenctl only prefers that)."""
        self.instance = instance
        self.in_order = in_order
        self.apart = apart
        gpus = list(instance.gpus)
        self.gpus = gpus
        requests = list(instance.requests)
        self.requests = requests
        threshold = policy.min_available_gpu_fraction
        self.cap = [g.total_bytes - g.used_bytes - policy.reserve for g in gpus]
        self.admit = [g.total_bytes - g.used_bytes - math.ceil(threshold * g.total_bytes)
                      for g in gpus]
        self.claims: dict[tuple[int, int], int] = {}  # (worker, gpu) -> bytes
        for w, request in enumerate(requests):
            for j, gpu in enumerate(gpus):
                utilization = utilization_for(request, gpu.total_bytes, policy)
                if utilization > 1.0 or self.admit[j] < 0:
                    continue
                claim = claim_bytes(utilization, gpu.total_bytes,
                                    request.estimate.cuda_context.bytes)
                if claim <= self.cap[j]:
                    self.claims[(w, j)] = claim
        # Groups: GPUs of one node and one size (a TP worker's GPUs come from one group).
        groups: dict[tuple[str, int], list[int]] = {}
        for j, gpu in enumerate(gpus):
            groups.setdefault((gpu.node, gpu.total_bytes), []).append(j)
        self.groups = groups
        # Variables
        self.names: list[tuple] = []
        self.x: dict[tuple[int, int], int] = {}
        self.z: dict[tuple[int, int], int] = {}
        self.y: dict[tuple[int, tuple], int] = {}
        for w, request in enumerate(requests):
            tp = request.tensor_parallel_size
            for key, members in groups.items():
                eligible = [j for j in members if (w, j) in self.claims]
                if tp > 1:
                    if len(eligible) < tp:
                        continue
                    self.y[(w, key)] = self._var(("y", w, key))
                for j in eligible:
                    self.x[(w, j)] = self._var(("x", w, j))
                    self.z[(w, j)] = self._var(("z", w, j))
        self.u = [self._var(("u", j)) for j in range(len(gpus))]
        self.p = [self._var(("p", w)) for w in range(len(requests))]
        # rank of each worker in gardenctl's placement order
        order = sorted(range(len(requests)), key=lambda w: placement_order(requests[w]))
        self.rank = {w: r for r, w in enumerate(order)}

    def _var(self, name: tuple) -> int:
        self.names.append(name)
        return len(self.names) - 1

    def solve(self, *, all_placed: bool, time_limit: float, by_memory: bool = False,
              at_least_placed: int = 0, at_most_gpus: int | None = None):
        """all_placed False: maximise workers placed (by_memory: the memory they claim instead).
        True: every worker placed, fewest GPUs. ``at_least_placed`` and ``at_most_gpus`` are
        what a policy achieved (valid cuts that only help the solver prune)."""
        import numpy as np
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_matrix

        n = len(self.names)
        rows, cols, vals, lower, upper = [], [], [], [], []

        def add(terms: list[tuple[int, float]], lo: float, hi: float) -> None:
            r = len(lower)
            for col, val in terms:
                rows.append(r)
                cols.append(col)
                vals.append(val)
            lower.append(lo)
            upper.append(hi)

        for w, request in enumerate(self.requests):
            tp = request.tensor_parallel_size
            if tp == 1:
                add([(self.x[(w, j)], 1.0) for j in range(len(self.gpus)) if (w, j) in self.x]
                    + [(self.p[w], -1.0)], 0, 0)
                continue
            chosen = []
            for key, members in self.groups.items():
                if (w, key) not in self.y:
                    continue
                y = self.y[(w, key)]
                chosen.append((y, 1.0))
                add([(self.x[(w, j)], 1.0) for j in members if (w, j) in self.x]
                    + [(y, -float(tp))], 0, 0)
            add(chosen + [(self.p[w], -1.0)], 0, 0)
        for j in range(len(self.gpus)):
            here = [w for w in range(len(self.requests)) if (w, j) in self.x]
            mib = {w: self.claims[(w, j)] / MiB for w in here}
            # capacity: claims <= cap x used
            add([(self.x[(w, j)], mib[w]) for w in here]
                + [(self.u[j], -self.cap[j] / MiB)], -np.inf, 0)
            # admission: claims minus the one admitted last <= total - others - ceil(f x total)
            add([(self.x[(w, j)], mib[w]) for w in here]
                + [(self.z[(w, j)], -mib[w]) for w in here], -np.inf, self.admit[j] / MiB)
            add([(self.z[(w, j)], 1.0) for w in here], -np.inf, 1)
            for w in here:
                add([(self.z[(w, j)], 1.0), (self.x[(w, j)], -1.0)], -np.inf, 0)
                if self.in_order:
                    # only the last worker placed on the GPU (in order) is exempt: z[w] = 1
                    # forbids every later worker there
                    later = [v for v in here if self.rank[v] > self.rank[w]]
                    if later:
                        add([(self.x[(v, j)], 1.0) for v in later]
                            + [(self.z[(w, j)], float(len(later)))], -np.inf, len(later))
        if self.apart:
            by_model: dict[str, list[int]] = {}
            for w, request in enumerate(self.requests):
                by_model.setdefault(request.model, []).append(w)
            for members in by_model.values():
                if len(members) < 2:
                    continue
                for j in range(len(self.gpus)):
                    here = [(self.x[(w, j)], 1.0) for w in members if (w, j) in self.x]
                    if len(here) > 1:
                        add(here, -np.inf, 1)
        # symmetry: identical GPUs of a node are used in index order
        for j in range(len(self.gpus) - 1):
            a, b = self.gpus[j], self.gpus[j + 1]
            if (a.node, a.total_bytes, a.used_bytes) == (b.node, b.total_bytes, b.used_bytes):
                add([(self.u[j], 1.0), (self.u[j + 1], -1.0)], 0, np.inf)

        if at_least_placed and not by_memory:
            add([(col, 1.0) for col in self.p], at_least_placed, np.inf)
        if at_most_gpus is not None and all_placed:
            add([(col, 1.0) for col in self.u], 0, at_most_gpus)

        cost = np.zeros(n)
        low = np.zeros(n)
        if all_placed:
            for j in self.u:
                cost[j] = 1.0
            for w in self.p:
                low[w] = 1.0
        else:
            for w, col in enumerate(self.p):
                request = self.requests[w]
                cost[col] = -(request.estimate.total_bytes * request.tensor_parallel_size / GiB
                              if by_memory else 1.0)
        matrix = coo_matrix((vals, (rows, cols)), shape=(len(lower), n)).tocsr()
        result = milp(cost, integrality=np.ones(n), bounds=Bounds(low, np.ones(n)),
                      constraints=LinearConstraint(matrix, lower, upper),
                      options={"time_limit": time_limit, "disp": False})
        return result

    def decode(self, values) -> dict:
        where: dict[str, tuple] = {}
        for (w, j), col in self.x.items():
            if values[col] > 0.5:
                gpu = self.gpus[j]
                node, indexes = where.get(self.requests[w].worker_id, (gpu.node, ()))
                where[self.requests[w].worker_id] = (node, indexes + (gpu.index,))
        return where

    def check(self, where: dict) -> None:
        """Re-check a MILP solution with integer bytes (no tolerance)."""
        claimed: dict[tuple[str, int], list[int]] = {}
        by_id = {r.worker_id: (w, r) for w, r in enumerate(self.requests)}
        index = {g.key: j for j, g in enumerate(self.gpus)}
        for worker_id, (node, gpus) in where.items():
            w, request = by_id[worker_id]
            assert len(gpus) == request.tensor_parallel_size, worker_id
            sizes = {self.gpus[index[(node, i)]].total_bytes for i in gpus}
            assert len(sizes) == 1, worker_id
            for i in gpus:
                claimed.setdefault((node, i), []).append(
                    (self.rank[w], self.claims[(w, index[(node, i)])]))
        if self.apart:
            seen: set[tuple] = set()
            for worker_id, (node, gpus) in where.items():
                model = by_id[worker_id][1].model
                for i in gpus:
                    assert (model, node, i) not in seen, f"MILP puts replicas of {model} together"
                    seen.add((model, node, i))
        for key, entries in claimed.items():
            j = index[key]
            claims = [c for _, c in entries]
            exempt = max(entries)[1] if self.in_order else max(claims)  # admitted last
            assert sum(claims) <= self.cap[j], f"MILP over-commits {key}"
            assert sum(claims) - exempt <= self.admit[j], f"MILP breaks admission on {key}"


def optimum(instance: Instance, policy: PlacementPolicy, outcomes: list[Outcome],
            time_limit: float, *, in_order: bool = False, apart: bool = False,
            relaxed: Optimum | None = None) -> Optimum:
    """Most workers placed, then fewest GPUs. ``outcomes``: what the policies achieved (a
    lower bound of workers placed, which spares the first solve when it is every worker, and
    an upper bound of GPUs). ``relaxed``: the optimum of a less constrained model (any
    order), which bounds this one when the solver runs out of time."""
    total = len(instance.requests)
    if apart:  # the policies may put replicas together: their results bound nothing here
        outcomes = []
    best_placed = max((o.placed for o in outcomes), default=0)
    fewest = min((o.gpus_used for o in outcomes if o.placed == total), default=None)
    start = time.perf_counter()
    model = Model(instance, policy, in_order=in_order, apart=apart)
    proven = True
    where: dict = {}
    placed = total
    if best_placed < total:  # some policy left workers out: how many can be placed?
        result = model.solve(all_placed=False, time_limit=time_limit,
                             at_least_placed=best_placed)
        if result.status == 0:
            placed = round(-result.fun)
            where = model.decode(result.x)
        else:
            proven = False
            bound = getattr(result, "mip_dual_bound", None)
            placed = total if bound is None or not math.isfinite(bound) else \
                min(total, math.floor(-bound + 1e-6))
            placed = max(placed, best_placed)
            if relaxed is not None:
                placed = min(placed, relaxed.placed)
            if result.x is not None:
                where = model.decode(result.x)
        assert result.status != 2, f"instance {instance.seed}: MILP misses a policy's placement"
    gpus_used = None
    if placed == total:
        result = model.solve(all_placed=True, time_limit=time_limit,
                             at_most_gpus=fewest)
        if result.status == 0:
            gpus_used = round(result.fun)
            where = model.decode(result.x)
        elif result.status == 2:
            # infeasible although a policy placed every worker: the MILP would be wrong
            assert fewest is None, f"instance {instance.seed}: MILP misses a policy's placement"
            placed = total - 1  # the bound on workers placed was not tight
        else:
            proven = False
            bound = getattr(result, "mip_dual_bound", None)
            gpus_used = math.ceil(bound - 1e-6) if bound is not None and math.isfinite(bound) \
                else 1
            if relaxed is not None and relaxed.gpus_used is not None:
                gpus_used = max(gpus_used, relaxed.gpus_used)
            if result.x is not None:
                where = model.decode(result.x)
    if where:
        model.check(where)
    return Optimum(placed, gpus_used, proven, time.perf_counter() - start, where)


def memory_optimum(instance: Instance, policy: PlacementPolicy, time_limit: float) -> float:
    """The most memory (GiB: estimate total x TP) that any placement can give workers."""
    model = Model(instance, policy)
    result = model.solve(all_placed=False, by_memory=True, time_limit=time_limit)
    if result.status == 0:
        return -result.fun
    bound = getattr(result, "mip_dual_bound", None)
    return -bound if bound is not None and math.isfinite(bound) else _memory(instance.requests)


def _memory(requests) -> float:
    return sum(r.estimate.total_bytes * r.tensor_parallel_size for r in requests) / GiB


# --- the run -----------------------------------------------------------------------------------

NO_SPREAD = "best_fit*"  # ablation: best fit with each replica its own model (no spreading)
RULE_OFF = PlacementPolicy(min_available_gpu_fraction=0.0)


@dataclass
class Row:
    instance: Instance
    outcomes: dict[str, Outcome]  # POLICIES + NO_SPREAD, gardenctl's default policy
    best: Optimum  # any admission order
    best_in_order: Optimum | None  # admission in gardenctl's placement order (--full)
    best_memory: float | None  # GiB placed by the memory optimum (--full)
    best_apart: Optimum | None  # replicas of a model on different GPUs (--full)
    rule_off: dict[str, Outcome]  # POLICIES with min_available_gpu_fraction 0
    best_rule_off: Optimum

    @property
    def workers(self) -> int:
        return len(self.instance.requests)


def _unspread(instance: Instance) -> Instance:
    requests = tuple(replace(r, model=f"{r.model}#{r.replica}") for r in instance.requests)
    return replace(instance, requests=requests)


def evaluate(seed: int, policy: PlacementPolicy, time_limit: float, full: bool) -> Row:
    instance = make_instance(seed, policy)
    outcomes = {name: run_policy(instance, policy, name) for name in POLICIES}
    outcomes[NO_SPREAD] = run_policy(_unspread(instance), policy, "best_fit")
    found = list(outcomes.values())
    best = optimum(instance, policy, found, time_limit)
    in_order = memory = apart = None
    if full:
        in_order = optimum(instance, policy, found, time_limit, in_order=True, relaxed=best)
        if best.placed == len(instance.requests):
            apart = optimum(instance, policy, found, time_limit, apart=True, relaxed=best)
        memory = (_memory(instance.requests) if best.placed == len(instance.requests)
                  else memory_optimum(instance, policy, time_limit))
    rule_off = {name: run_policy(instance, RULE_OFF, name) for name in POLICIES}
    best_rule_off = optimum(instance, RULE_OFF, list(rule_off.values()), time_limit)
    return Row(instance, outcomes, best, in_order, memory, apart, rule_off, best_rule_off)


def _evaluate_star(args: tuple) -> Row:
    fleets.use_catalog_only()
    return evaluate(*args)


def _gpu_table(rows: list[Row], outcomes_of, best_of, names, extra_rows=()) -> list[str]:
    """Policies against an optimum on the instances where that optimum places every worker."""
    full = [r for r in rows if best_of(r).placed == r.workers]
    lines = [f"{'policy':<22} {'places all':>11} {'= optimum':>10} {'<= opt+1':>9} "
             f"{'mean extra':>11} {'max extra':>10} {'GPUs (sum)':>11} {'optimum (sum)':>14}"]
    lines.append("-" * len(lines[0]))
    shares = {}
    for name, label in names:
        done = [r for r in full if outcomes_of(r)[name].unplaced == 0]
        extras = [outcomes_of(r)[name].gpus_used - best_of(r).gpus_used for r in done]
        share = sum(1 for e in extras if e <= 1) / len(full) if full else 1.0
        shares[name] = share
        lines.append(
            f"{label:<22} {len(done):>5} {len(done) / max(1, len(full)):>5.0%} "
            f"{sum(1 for e in extras if e <= 0) / max(1, len(full)):>10.1%} {share:>9.1%} "
            f"{statistics.mean(extras) if extras else 0:>11.2f} {max(extras, default=0):>10} "
            f"{sum(outcomes_of(r)[name].gpus_used for r in done):>11} "
            f"{sum(best_of(r).gpus_used for r in done):>14}")
    for label, gpus_of in extra_rows:  # gpus_of: GPUs used, None when not every worker placed
        done = [r for r in full if gpus_of(r) is not None]
        extras = [gpus_of(r) - best_of(r).gpus_used for r in done]
        lines.append(f"{label:<22} {len(done):>5} {len(done) / max(1, len(full)):>5.0%} "
                     f"{sum(1 for e in extras if e <= 0) / max(1, len(full)):>10.1%} "
                     f"{sum(1 for e in extras if e <= 1) / max(1, len(full)):>9.1%} "
                     f"{statistics.mean(extras) if extras else 0:>11.2f} "
                     f"{max(extras, default=0):>10} {sum(gpus_of(r) for r in done):>11} "
                     f"{sum(best_of(r).gpus_used for r in done):>14}")
    return lines, shares, len(full)


LABELS = (("best_fit", "best_fit (gardenctl)"), ("most_free", "most_free (ndif)"),
          ("first_fit", "first_fit"), ("random", "random"))


def _kinds(row: Row) -> dict[str, bool]:
    requests = row.instance.requests
    return {
        "one GPU size": len({g.total_bytes for g in row.instance.gpus}) == 1,
        "two GPU sizes": len({g.total_bytes for g in row.instance.gpus}) > 1,
        "no TP>1 worker": all(q.tensor_parallel_size == 1 for q in requests),
        "some TP>1 worker": any(q.tensor_parallel_size > 1 for q in requests),
    }


def summarize(rows: list[Row]) -> tuple[str, bool, dict]:
    full_run = rows[0].best_in_order is not None
    policies = LABELS + ((NO_SPREAD, "best_fit*"),)
    lines = []
    lines.append(f"instances: {len(rows)} ({sum(r.instance.regime == 'roomy' for r in rows)} "
                 f"roomy, {sum(r.instance.regime == 'tight' for r in rows)} tight); workers "
                 f"{min(r.workers for r in rows)}-{max(r.workers for r in rows)} (mean "
                 f"{statistics.mean(r.workers for r in rows):.1f}), GPUs "
                 f"{min(len(r.instance.gpus) for r in rows)}-"
                 f"{max(len(r.instance.gpus) for r in rows)}; with TP>1 workers: "
                 f"{sum(_kinds(r)['some TP>1 worker'] for r in rows)}; with two GPU sizes: "
                 f"{sum(_kinds(r)['two GPU sizes'] for r in rows)}; with replicas: "
                 f"{sum(any(q.replica > 0 for q in r.instance.requests) for r in rows)}")
    solves = [o for r in rows for o in (r.best, r.best_in_order, r.best_apart, r.best_rule_off)
              if o is not None]
    unproven = sum(1 for o in solves if not o.proven)
    lines.append(f"MILP optima not proven within the time limit: {unproven} of {len(solves)} "
                 "(compared with the MILP's bound instead, which can only flatter the optimum)")
    lines.append("")
    extra = ()
    if full_run:
        extra = (("optimum, in order", lambda r: r.best_in_order.gpus_used
                  if r.best_in_order.placed == r.workers else None),
                 ("optimum, apart", lambda r: r.best_apart.gpus_used
                  if r.best_apart is not None and r.best_apart.placed == r.workers else None))
    table, shares, n_full = _gpu_table(rows, lambda r: r.outcomes, lambda r: r.best, policies,
                                       extra_rows=extra)
    lines.append(f"A. GPUs used against the optimum, on the {n_full} instances where the "
                 "optimum places every worker")
    lines += table
    lines.append("   places all: the policy places every worker too; <= opt+1: and uses at most "
                 "one GPU more than the optimum (as a share of all these instances: the target "
                 "is 95% for best_fit); extra and sums: over the instances the policy places "
                 "all. best_fit* (ablation): best fit with every replica treated as its own "
                 "model, i.e. without spreading replicas over different GPUs"
                 + ("; optimum, in order: the best placement when workers must be admitted in "
                    "gardenctl's placement order (largest first), which all four policies share; "
                    "optimum, apart: the best placement that never puts two replicas of a model "
                    "on one GPU (gardenctl's soft preference made a hard constraint)"
                    if full_run else ""))
    lines.append("")
    shares_order = {}
    if full_run:
        table, shares_order, n_order = _gpu_table(rows, lambda r: r.outcomes,
                                                  lambda r: r.best_in_order, policies)
        lines.append(f"A2. GPUs used against the in-order optimum, on the {n_order} instances "
                     "where it places every worker (how well each policy chooses GPUs, given "
                     "gardenctl's order)")
        lines += table
        lines.append("")
        table, _, n_apart = _gpu_table(
            [r for r in rows if r.best_apart is not None], lambda r: r.outcomes,
            lambda r: r.best_apart, policies)
        lines.append(f"A3. GPUs used against the optimum that keeps replicas of a model on "
                     f"different GPUs, on the {n_apart} instances where it places every worker")
        lines += table
        lines.append("")
    lines.append("B. Workers left unplaced")
    header = (f"{'policy':<22} {'unplaced':>9} {'instances':>10} {'> optimum':>10} "
              f"{'excess':>7} {'max excess':>11} {'memory unplaced':>16}")
    lines.append(header)
    lines.append("-" * len(header))
    for regime in ("all", "tight"):
        chosen = rows if regime == "all" else [r for r in rows if r.instance.regime == "tight"]
        total_memory = sum(_memory(r.instance.requests) for r in chosen)
        lines.append(f"  {regime} instances ({len(chosen)}; {sum(r.workers for r in chosen)} "
                     f"workers, {total_memory:,.0f} GiB):")
        for name, label in policies:
            excess = [r.outcomes[name].unplaced - (r.workers - r.best.placed) for r in chosen]
            unplaced_memory = sum(r.outcomes[name].unplaced_gib for r in chosen)
            lines.append(f"{label:<22} {sum(r.outcomes[name].unplaced for r in chosen):>9} "
                         f"{sum(1 for r in chosen if r.outcomes[name].unplaced):>10} "
                         f"{sum(1 for e in excess if e > 0):>10} {sum(excess):>7} "
                         f"{max(excess, default=0):>11} "
                         f"{unplaced_memory / total_memory:>15.1%}")
        optima = [("optimum (count)", lambda r: r.best)]
        if full_run:
            optima.append(("optimum, in order", lambda r: r.best_in_order))
        for label, best_of in optima:
            lines.append(f"{label:<22} {sum(r.workers - best_of(r).placed for r in chosen):>9} "
                         f"{sum(1 for r in chosen if best_of(r).placed < r.workers):>10}")
        if full_run:
            memory_left = sum(_memory(r.instance.requests) - r.best_memory for r in chosen)
            lines.append(f"{'optimum (memory)':<22} {'':>9} {'':>10} {'':>10} {'':>7} {'':>11} "
                         f"{memory_left / total_memory:>15.1%}")
    lines.append("   unplaced: workers left out (sum); instances: with any left out; > optimum: "
                 "instances where the policy leaves out more workers than the fewest possible; "
                 "excess: how many more (sum, max); memory unplaced: the left-out workers' "
                 "estimates (total x TP) as a share of all workers'. optimum (count) leaves out "
                 "the fewest workers (it may drop one big worker to place several small ones)"
                 + ("; optimum (memory) places the most memory" if full_run else ""))
    lines.append("")
    lines.append("C. Head to head, per instance: fewer unplaced workers wins; equal: fewer GPUs")
    header = f"{'best_fit vs':<22} {'best_fit better':>16} {'equal':>7} {'best_fit worse':>15}"
    lines.append(header)
    lines.append("-" * len(header))
    for outcomes_of, suffix, mine in ((lambda r: r.outcomes, "", "best_fit"),
                                      (lambda r: r.outcomes, "", NO_SPREAD),
                                      (lambda r: r.rule_off, " (rule off)", "best_fit")):
        for name in SEED_POLICIES:
            better = worse = equal = 0
            for r in rows:
                a = (outcomes_of(r)[mine].unplaced, outcomes_of(r)[mine].gpus_used)
                b = (outcomes_of(r)[name].unplaced, outcomes_of(r)[name].gpus_used)
                better += a < b
                worse += a > b
                equal += a == b
            label = ("best_fit* vs " if mine == NO_SPREAD else "") + name + suffix
            lines.append(f"{label:<22} {better:>16} {equal:>7} {worse:>15}")
    lines.append("")
    table, shares_off, n_off = _gpu_table(rows, lambda r: r.rule_off, lambda r: r.best_rule_off,
                                          LABELS)
    lines.append("D. Admission rule off (min_available_gpu_fraction 0 for the policies and the "
                 f"optimum), on the {n_off} instances where the optimum places every worker")
    lines += table
    lines.append("   unplaced workers, all instances: " + ", ".join(
        f"{name} {sum(r.rule_off[name].unplaced for r in rows)}" for name, _ in LABELS)
        + f", optimum {sum(r.workers - r.best_rule_off.placed for r in rows)}")
    lines.append("")
    lines.append("E. Share of instances where a policy places all and is within one GPU of the "
                 "optimum, by kind of fleet (rule on)")
    kinds = list(_kinds(rows[0]))
    lines.append(f"{'policy':<22}" + "".join(f"{k:>18}" for k in kinds))
    full = [r for r in rows if r.best.placed == r.workers]
    for name, label in policies:
        cells = []
        for kind in kinds:
            chosen = [r for r in full if _kinds(r)[kind]]
            good = sum(1 for r in chosen if r.outcomes[name].unplaced == 0
                       and r.outcomes[name].gpus_used <= r.best.gpus_used + 1)
            cells.append(f"{good / max(1, len(chosen)):.0%} of {len(chosen)}")
        lines.append(f"{label:<22}" + "".join(f"{c:>18}" for c in cells))
    lines.append("")
    worst = sorted(rows, key=lambda r: (
        -((r.outcomes["best_fit"].gpus_used - r.best.gpus_used)
          if r.best.gpus_used is not None and r.outcomes["best_fit"].unplaced == 0 else -99),
        r.instance.seed))[:5]
    lines.append("best_fit's largest GPU gaps (see one with --show SEED):")
    for r in worst:
        o = r.outcomes["best_fit"]
        lines.append(f"  seed {r.instance.seed}: {r.workers} workers on {len(r.instance.gpus)} "
                     f"GPUs; best_fit {o.gpus_used} GPUs, first_fit "
                     f"{r.outcomes['first_fit'].gpus_used}, optimum {r.best.gpus_used}"
                     f"{'' if r.best.proven else ' (bound)'}")
    ok = shares["best_fit"] >= TARGET_WITHIN_ONE
    figures = {"within_one": shares, "within_one_in_order": shares_order,
               "within_one_rule_off": shares_off}
    return "\n".join(lines), ok, figures


def show(seed: int, policy: PlacementPolicy, time_limit: float) -> None:
    row = evaluate(seed, policy, time_limit, True)
    instance = row.instance
    print(f"instance {seed} ({instance.regime}, demand {instance.demand_share:.0%} of the fleet)")
    for node in instance.inventory.nodes:
        for gpu in node.gpus:
            print(f"  {gpu.node} GPU {gpu.index}: {gpu.name} {gpu.total_bytes / GiB:.2f} GiB, "
                  f"others {gpu.used_bytes / GiB:.0f} GiB")
    for request in instance.requests:
        claim = {gpu.total_bytes: claim_bytes(utilization_for(request, gpu.total_bytes, policy),
                                              gpu.total_bytes, request.estimate.cuda_context.bytes)
                 for gpu in instance.gpus}
        print(f"  {request.worker_id} {request.estimate.model} len {request.estimate.max_model_len}"
              f" tp {request.tensor_parallel_size}: claim per GPU "
              + ", ".join(f"{c / GiB:.1f} GiB on {t / GiB:.0f}" for t, c in sorted(claim.items())))
    columns = [(name, row.outcomes[name].where) for name in (*POLICIES, NO_SPREAD)]
    columns += [("optimum", row.best.where), ("opt in order", row.best_in_order.where)]
    if row.best_apart is not None:
        columns.append(("opt apart", row.best_apart.where))
    for name in (*POLICIES, NO_SPREAD):
        outcome = row.outcomes[name]
        print(f"{name}: {outcome.placed} placed, {outcome.unplaced} unplaced, "
              f"{outcome.gpus_used} GPUs")
    for label, best in (("optimum", row.best), ("optimum in order", row.best_in_order),
                        ("optimum, replicas apart", row.best_apart)):
        if best is None:
            continue
        print(f"{label}: {best.placed} placed, {best.gpus_used} GPUs, "
              f"{'proven' if best.proven else 'not proven'}")
    table = []
    for request in instance.requests:
        cells = []
        for _, where in columns:
            spot = where.get(request.worker_id)
            cells.append("-" if spot is None else f"{spot[0]}:{','.join(map(str, spot[1]))}")
        table.append((request.worker_id, cells))
    width = 2 + max(len(text) for _, cells in table for text in cells + [n for n, _ in columns])
    print(f"{'worker':<18}" + "".join(f"{name:>{width}}" for name, _ in columns))
    for worker_id, cells in table:
        print(f"{worker_id:<18}" + "".join(f"{c:>{width}}" for c in cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1000, help="seed of the first instance")
    parser.add_argument("--time-limit", type=float, default=5.0, help="seconds per MILP solve")
    parser.add_argument("--full", action="store_true",
                        help="also the in-order and memory optima (several times slower)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes (default: one per core)")
    parser.add_argument("--show", type=int, help="print one instance (by seed) in detail")
    args = parser.parse_args()
    try:
        import scipy  # noqa: F401
    except ImportError:
        print("packing_quality needs scipy: .venv/bin/pip install scipy "
              "(or the bench extra)", file=sys.stderr)
        return 2
    fleets.use_catalog_only()
    policy = PlacementPolicy()
    if args.show is not None:
        show(args.show, policy, args.time_limit)
        return 0
    machine = fleets.machine()
    print(machine.markdown())
    start = time.perf_counter()
    work = [(args.seed + k, policy, args.time_limit, args.full) for k in range(args.instances)]
    rows = []
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for row in pool.imap(_evaluate_star, work, chunksize=2):
            rows.append(row)
            if len(rows) % 50 == 0:
                print(f"  {len(rows)} instances, {time.perf_counter() - start:.0f} s",
                      file=sys.stderr, flush=True)
    text, ok, figures = summarize(rows)
    print(text)
    milp_times = [o.seconds for r in rows
                  for o in (r.best, r.best_in_order, r.best_apart, r.best_rule_off)
                  if o is not None]
    place_times = [o.seconds for r in rows for o in r.outcomes.values()]
    print(f"\ntime: {time.perf_counter() - start:.0f} s in all ({args.jobs} processes); MILP "
          f"optimum median {statistics.median(milp_times) * 1000:.0f} ms, max "
          f"{max(milp_times):.1f} s; place() median {statistics.median(place_times) * 1000:.2f} ms")
    within = figures["within_one"]["best_fit"]
    print(f"target: best_fit places all and is within one GPU of the optimum on >= "
          f"{TARGET_WITHIN_ONE:.0%} of the instances where the optimum places every worker: "
          f"{within:.1%} -> " + ("met" if ok else "MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
