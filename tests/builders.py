"""Small factories for the values the pure planning code takes (no I/O)."""

from __future__ import annotations

from gardenctl.estimate.types import Item, MemoryEstimate
from gardenctl.inventory.model import Gpu, Inventory, Node
from gardenctl.placement.model import WorkerRequest
from gardenctl.spec.models import PlacementPolicy
from gardenctl.units import GiB, MiB


def estimate(budget_gib: float, *, context_gib: float = 0.5, model: str = "org/model",
             tp: int = 1, max_model_len: int = 4096) -> MemoryEstimate:
    """An estimate whose vLLM budget is ``budget_gib`` (all of it weights, for simplicity)."""
    return MemoryEstimate(
        estimator="gardenctl", model=model, tensor_parallel_size=tp,
        max_model_len=max_model_len, max_model_len_source="test", min_concurrency=1,
        kv_bytes_per_token=0, kv_bytes_per_token_source="test",
        weights=Item(int(budget_gib * GiB), "test"), kv_cache=Item(0, "test"),
        activation=Item(0, "test"), cuda_graph=Item(0, "test"), non_torch=Item(0, "test"),
        cuda_context=Item(int(context_gib * GiB), "test"),
    )


def inventory(*nodes: tuple[str, int, float], used_gib: float = 0.0) -> Inventory:
    """inventory(("node-a", 4, 24)) -> a node with four 24 GiB GPUs."""
    built = []
    for name, count, memory_gib in nodes:
        gpus = tuple(Gpu(node=name, index=i, name="GPU", total_bytes=int(memory_gib * GiB),
                         used_bytes=int(used_gib * GiB)) for i in range(count))
        built.append(Node(name=name, gpus=gpus))
    return Inventory(nodes=tuple(built), source="test")


def request(worker_id: str, budget_gib: float, *, tp: int = 1, priority: int = 0,
            utilization: float | None = None, pin_node: str | None = None,
            pin_gpus: tuple[int, ...] | None = None, sizing: str = "s") -> WorkerRequest:
    _, model, replica = worker_id.split("/")
    return WorkerRequest(worker_id=worker_id, model=model, replica=int(replica),
                         tensor_parallel_size=tp, priority=priority,
                         estimate=estimate(budget_gib, tp=tp), utilization=utilization,
                         pin_node=pin_node, pin_gpus=pin_gpus, sizing_hash=sizing)


def policy(**overrides) -> PlacementPolicy:
    values = {"reserve": 0, "safety_margin": 0.0, "min_available_gpu_fraction": 0.3}
    values.update(overrides)
    return PlacementPolicy(**values)


__all__ = ["GiB", "MiB", "estimate", "inventory", "request", "policy"]


def observed_from(plan, phase: str = "ready"):
    """What would run after applying ``plan``: its workers as the runtime would report them."""
    from gardenctl.observe import Observed, ObservedWorker
    from gardenctl.vocab import Phase

    workers = []
    for step in plan.steps:
        if step.worker is None or step.conditional:
            continue
        workers.append(ObservedWorker(spec=step.worker, phase=Phase(phase),
                                      pid=1000 + len(workers), started_at=1000.0,
                                      ready_at=1000.0 if phase == "ready" else None))
    return Observed(tuple(workers), source="test")


def garden_text(models: str, *, policy_yaml: str = "",
                gpus: str = "{name: L4, memory: 24GiB, count: 2}") -> bytes:
    return (f"name: lab\n{policy_yaml}inventory:\n  nodes:\n    - name: node-a\n"
            f"      gpus: [{gpus}]\nmodels:\n{models}").encode()


def plan_for(text: bytes, observed=None, budgets: dict | None = None, world=None):
    """make_plan on a garden text, with synthetic estimates (budget GiB per model name) and
    ``world`` (Circumstances: the time, environment names, busy ports, history)."""
    from gardenctl.inventory.declared import inventory_from_spec
    from gardenctl.observe import Observed
    from gardenctl.planner import make_plan
    from gardenctl.spec import parse_garden

    loaded = parse_garden(text, "garden.yaml")
    garden = loaded.garden
    budgets = budgets or {}
    estimates = {m.name: estimate(budgets.get(m.name, 4), tp=m.tensor_parallel_size,
                                  max_model_len=m.max_model_len or 4096)
                 for m in garden.resolved_models()}
    inv = inventory_from_spec(garden.inventory, "declared in garden.yaml")
    return make_plan(loaded, inv, observed or Observed(), estimates, world)
