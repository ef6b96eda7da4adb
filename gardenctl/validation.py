"""What `gardenctl validate` checks beyond the file itself: the garden against its hardware.

With an inventory (declared in the garden or given with --inventory): pinned nodes and GPUs must
exist, tensor parallelism must fit on a node, and the whole garden must fit (every worker placed
on an empty fleet). Each problem is an issue located at the model's line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from gardenctl.errors import SpecIssue
from gardenctl.estimate.types import MemoryEstimate
from gardenctl.inventory.model import Inventory
from gardenctl.placement.model import Placement, Unplaced
from gardenctl.placement.solver import place
from gardenctl.spec.checks import Findings
from gardenctl.spec.loader import LoadedGarden
from gardenctl.spec.models import ModelSpec
from gardenctl.spec.yamlsource import SourceMap
from gardenctl.workers import build_requests


@dataclass(frozen=True)
class FitReport:
    issues: tuple[SpecIssue, ...]
    placement: Placement | None


def check_against_inventory(loaded: LoadedGarden, inventory: Inventory,
                            estimates: Mapping[str, MemoryEstimate]) -> FitReport:
    garden = loaded.garden
    source = loaded.source
    models = loaded.models()
    issues: list[SpecIssue] = []
    bad: set[int] = set()
    nodes = {node.name: node for node in inventory.nodes}
    largest = max((len(node.gpus) for node in inventory.nodes), default=0)
    for i, model in enumerate(models):
        before = len(issues)
        pin = model.placement
        if pin and pin.node is not None and pin.node not in nodes:
            issues.append(source.issue(_field(loaded, i, "placement"),
                                       f"pinned to node {pin.node!r}, which the inventory "
                                       f"({inventory.source}) does not have",
                                       hint="nodes: " + ", ".join(sorted(nodes))))
            bad.add(i)
            continue
        candidates = [nodes[pin.node]] if pin and pin.node else list(nodes.values())
        if pin and pin.gpus is not None:
            for node in candidates:
                present = {gpu.index for gpu in node.gpus}
                missing = sorted(set(pin.gpus) - present)
                if missing and (pin.node or len(candidates) == 1):
                    issues.append(source.issue(
                        _field(loaded, i, "placement"),
                        f"pinned GPU(s) {', '.join(map(str, missing))} do not exist on "
                        f"{node.name}", hint=f"it has GPUs 0-{len(node.gpus) - 1}"))
        most = max((len(node.gpus) for node in candidates), default=0)
        if model.tensor_parallel_size > most:
            issues.append(source.issue(
                _field(loaded, i, "tensor_parallel_size"),
                f"tensor_parallel_size {model.tensor_parallel_size} needs that many GPUs on one "
                f"node; the largest {'allowed ' if pin and pin.node else ''}node has {most}",
                hint=f"at most {largest} here"))
        if len(issues) > before:
            bad.add(i)
    fitting = [m for i, m in enumerate(models) if i not in bad]  # the rest is still checked
    placement = place(build_requests(garden, fitting, estimates), inventory, garden.placement)
    index = {m.name: i for i, m in enumerate(models)}
    findings = Findings(source)  # thousands of workers that do not fit: the first in full
    for unplaced in sorted(placement.unplaced, key=lambda u: (index[u.model], u.worker_id)):
        findings.add("error", partial(_unplaced_issue, source, unplaced,
                                      index[unplaced.model], inventory.source))
    issues += findings.issues()
    return FitReport(tuple(issues), None if bad else placement)


def _unplaced_issue(source: SourceMap, unplaced: Unplaced, index: int,
                    inventory: str) -> SpecIssue:
    detail = "; ".join(r.message for r in unplaced.reasons)
    return source.issue(("models", index), f"{unplaced.worker_id} does not fit on the "
                        f"inventory ({inventory}): {detail}",
                        hint="lower max_model_len or min_concurrency, use a smaller or "
                        "quantized model, lower priority elsewhere, or add GPUs")


def _field(loaded: LoadedGarden, index: int, name: str) -> tuple:
    model = loaded.garden.models[index]
    if name in model.model_fields_set:
        return ("models", index, name)
    if name in loaded.garden.defaults.model_fields_set:
        return ("defaults", name)
    return ("models", index)


def estimate_warnings(loaded: LoadedGarden, models: Sequence[ModelSpec],
                      estimates: Mapping[str, MemoryEstimate]) -> list[SpecIssue]:
    """The estimator's warnings (a guessed size, a default length), located at each model
    (the first in full, the others counted)."""
    findings = Findings(loaded.source)
    for i, model in enumerate(models):
        for warning in estimates[model.name].warnings:
            findings.add("warning", partial(loaded.source.issue, ("models", i, "model"), warning,
                                            severity="warning"))
    return findings.issues()


__all__ = ["FitReport", "check_against_inventory", "estimate_warnings"]
