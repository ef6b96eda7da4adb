"""What `gardenctl validate` checks beyond the file itself: the garden against its hardware.

With an inventory (declared in the garden or given with --inventory): pinned nodes and GPUs must
exist, tensor parallelism must fit on a node, and the whole garden must fit (every worker placed
on an empty fleet). Each problem is an issue located at the model's line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from gardenctl.errors import SpecIssue
from gardenctl.estimate.architecture import config_out_of_range
from gardenctl.estimate.types import MemoryEstimate, ModelMetadata
from gardenctl.inventory.model import Inventory
from gardenctl.placement.model import Placement, Unplaced
from gardenctl.placement.solver import place
from gardenctl.preflight import Finding, HubAnswer, HubInfo, check_model
from gardenctl.preflight.access import TOKEN_NAMES
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


MetadataReader = Callable[[str, "str | None"], ModelMetadata]


class SaneMetadataReader:
    """A metadata reader that reads each model once and drops a config.json whose numbers are
    out of any sane range (the estimate then guesses; preflight_issues, which reads the file
    as it is through `raw`, reports it as an error), so no estimate does arithmetic on them.
    Pass the same one to planner.gather_estimates and preflight_issues."""

    def __init__(self, reader: MetadataReader) -> None:
        self.reader = reader
        self.read: dict[tuple[str, str | None], ModelMetadata] = {}

    def raw(self, ref: str, revision: str | None) -> ModelMetadata:
        key = (ref, revision)
        if key not in self.read:
            self.read[key] = self.reader(ref, revision)
        return self.read[key]

    def __call__(self, ref: str, revision: str | None) -> ModelMetadata:
        metadata = self.raw(ref, revision)
        if metadata.config is not None and config_out_of_range(metadata.config):
            return replace(metadata, config=None, notes=(
                *metadata.notes, "config.json has values out of any sane range"))
        return metadata


def preflight_issues(loaded: LoadedGarden, models: Sequence[ModelSpec],
                     inventory: Inventory | None,
                     estimates: Mapping[str, MemoryEstimate] | None,
                     metadata_reader: MetadataReader,
                     hub_info: HubInfo | None = None,
                     environ: Mapping[str, str] | None = None) -> list[SpecIssue]:
    """The pre-flight findings of every model (gardenctl.preflight.check_model), located at
    the garden.yaml line of the field each concerns. Errors mean vLLM would refuse to start.

    ``models``: loaded.models(), in file order. ``inventory``: the GPUs a model may run on
    (its pinned node and GPUs, else all); None: dtype and quantization are not checked.
    ``estimates``: the release each model was sized for (`vllm_version`,
    `vllm_version_assumed`); None: each model's declared vllm_version. ``metadata_reader``:
    as for planner.gather_estimates (wrap it in SaneMetadataReader and pass the same one to
    both: each model is read once). ``hub_info``: asks the Hub (preflight.ask_hub) whether a
    model that is not a local folder exists and is gated; None: the Hub is not asked.
    ``environ``: the controller's environment (workers inherit HF_TOKEN from it)."""
    environ = os.environ if environ is None else environ
    inherited = {name for name in TOKEN_NAMES if environ.get(name)}
    if _token_file(environ):
        inherited.add("HF_TOKEN")
    findings = Findings(loaded.source)
    asked: dict[tuple[str, str | None], HubAnswer] = {}
    for i, model in enumerate(models):
        reader = (metadata_reader.raw if isinstance(metadata_reader, SaneMetadataReader)
                  else metadata_reader)
        metadata = reader(model.model, model.revision)
        version: str | None
        if estimates is not None and model.name in estimates:
            version = estimates[model.name].vllm_version
            assumed = estimates[model.name].vllm_version_assumed
        else:
            version, assumed = model.vllm_version, model.vllm_version is None
        hub = None
        if hub_info is not None and not Path(model.model).expanduser().is_dir():
            key = (model.model, model.revision)
            if key not in asked:
                asked[key] = hub_info(model.model, model.revision)
            hub = asked[key]
        names = frozenset(model.env) | inherited
        for finding in check_model(model, metadata, _gpu_names(model, inventory), version,
                                   assumed, names, hub):
            findings.add(finding.severity, partial(_finding_issue, loaded, i, model, finding))
    return findings.issues()


def _finding_issue(loaded: LoadedGarden, index: int, model: ModelSpec,
                   finding: Finding) -> SpecIssue:
    path = ("models", index, "model") if finding.field == "model" else _field(
        loaded, index, finding.field)
    return loaded.source.issue(path, f"{model.name}: {finding.message}", hint=finding.hint,
                               severity=finding.severity)


def _gpu_names(model: ModelSpec, inventory: Inventory | None) -> list[str]:
    if inventory is None:
        return []
    pin = model.placement
    gpus = [g for g in inventory.gpus if not (pin and pin.node) or g.node == pin.node]
    if pin and pin.gpus is not None:
        gpus = [g for g in gpus if g.index in pin.gpus] or gpus
    return [g.name for g in gpus]


def _token_file(environ: Mapping[str, str]) -> bool:
    """huggingface_hub's stored token (`huggingface-cli login`), which vLLM also reads."""
    path = environ.get("HF_TOKEN_PATH") or os.path.join(
        environ.get("HF_HOME") or os.path.join(environ.get("XDG_CACHE_HOME") or "~/.cache",
                                               "huggingface"), "token")
    return Path(path).expanduser().is_file()


__all__ = ["FitReport", "MetadataReader", "check_against_inventory", "estimate_warnings",
           "preflight_issues", "SaneMetadataReader"]
