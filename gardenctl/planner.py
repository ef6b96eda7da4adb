"""The planning pipeline, stage by stage (README "Development" shows the data flow):

    garden.yaml --load_garden--> Garden
    Garden.models --estimate_memory--> MemoryEstimate per model   (metadata read at the edge)
    place(requests, Inventory, holdings) --> Placement + Unplaced
    desired workers + Observed --reconcile--> Plan

`make_plan` is pure: the same garden, inventory, observed workers and estimates give the same
plan, byte for byte. Only `gather_estimates` touches the disk (config.json, safetensors headers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from gardenctl.estimate.types import EstimateRequest, MemoryEstimate, ModelMetadata
from gardenctl.inventory.model import Inventory
from gardenctl.observe import Observed
from gardenctl.placement.ledger import GpuKey
from gardenctl.placement.solver import place
from gardenctl.plan.model import ModelSummary, Plan
from gardenctl.reconcile import Circumstances, ModelRollout, reconcile
from gardenctl.spec.loader import LoadedGarden
from gardenctl.spec.models import ModelSpec
from gardenctl.vocab import StepKind
from gardenctl.workers import build_requests, desired_workers, sizing_hash

MetadataReader = Callable[[str, "str | None"], ModelMetadata]


VersionOf = Callable[[ModelSpec], "tuple[str | None, str]"]


def estimate_request(model: ModelSpec, vllm_version: str | None = None) -> EstimateRequest:
    """What the estimator is asked for ``model``; ``vllm_version``: the release its
    vllm_command runs (None: the estimate assumes one and warns)."""
    return EstimateRequest(
        model=model.model,
        revision=model.revision,
        max_model_len=model.max_model_len,
        tensor_parallel_size=model.tensor_parallel_size,
        dtype=model.dtype,
        quantization=model.quantization,
        kv_cache_dtype=model.kv_cache_dtype,
        min_concurrency=model.min_concurrency,
        enforce_eager=model.enforce_eager,
        max_num_seqs=model.max_num_seqs,
        max_num_batched_tokens=model.max_num_batched_tokens,
        vllm_version=vllm_version,
    )


def gather_estimates(models: Sequence[ModelSpec], estimator: str,
                     read_metadata: MetadataReader | None = None,
                     version_of: VersionOf | None = None) -> dict[str, MemoryEstimate]:
    """Read each model's metadata once (I/O) and estimate its memory (pure).

    ``version_of(model)`` gives the vLLM release the model's vllm_command runs and a note
    (e.g. why it could not be detected; added to the estimate's warnings when not empty);
    without it the declared `vllm_version` is used, else the estimate assumes a release."""
    from gardenctl.estimate import estimate_memory, read_model_metadata

    reader = read_metadata or read_model_metadata
    cache: dict[tuple[str, str | None], ModelMetadata] = {}
    known: dict[tuple[EstimateRequest, str], MemoryEstimate] = {}  # models asking the same
    estimates = {}
    for model in models:
        key = (model.model, model.revision)
        if key not in cache:
            cache[key] = reader(model.model, model.revision)
        version, note = version_of(model) if version_of else (model.vllm_version, "")
        request = estimate_request(model, version)
        if (request, note) not in known:
            estimate = estimate_memory(request, cache[key], estimator)
            if note:  # one warning: what was assumed, and why no release was found
                assumed = [w for w in estimate.warnings if w.startswith("assumed vLLM")]
                rest = tuple(w for w in estimate.warnings if w not in assumed)
                said = (f"assumed vLLM {estimate.vllm_version}: {note}; declare it with "
                        "defaults.vllm_version" if assumed else note)
                estimate = replace(estimate, warnings=(said, *rest))
            known[(request, note)] = estimate
        estimates[model.name] = known[(request, note)]
    return estimates


def used_by_others(inventory: Inventory, observed: Observed, garden: str) -> dict[GpuKey, int]:
    """Memory on each GPU that is not this garden's: other programs and other gardens.

    A declared inventory gives other programs' use; the claims of other gardens' workers (in
    the same state directory) are added. NVML's figure includes every process: subtract what
    this garden's processes use (per-process memory, or their claims where the driver does not
    say); another garden's worker counts for at least its claim, even while it loads."""
    mine = observed.of_garden(garden)
    claims = _claims(mine)
    other_claims = _claims(observed.others_than(garden))
    if not inventory.used_includes_ours:
        return {gpu.key: gpu.used_bytes + other_claims.get(gpu.key, 0) for gpu in inventory.gpus}
    ours = {pid for w in mine.workers for pid in w.pids}
    result = {}
    for gpu in inventory.gpus:
        held = [p for p in gpu.processes if p.pid in ours]
        if held and all(p.used_bytes is not None for p in held):
            used = max(0, gpu.used_bytes - sum(p.used_bytes or 0 for p in held))
        else:
            used = max(0, gpu.used_bytes - claims.get(gpu.key, 0))
        result[gpu.key] = max(used, other_claims.get(gpu.key, 0))
    return result


def _claims(observed: Observed) -> dict[GpuKey, int]:
    """Per GPU, what the workers that hold their place there claim."""
    claims: dict[GpuKey, int] = {}
    for holding in observed.holdings():
        for index in holding.gpus:
            key = (holding.node, index)
            claims[key] = claims.get(key, 0) + holding.claim_bytes
    return claims


def make_plan(loaded: LoadedGarden, inventory: Inventory, observed: Observed,
              estimates: Mapping[str, MemoryEstimate],
              world: Circumstances | None = None) -> Plan:
    """The plan. ``observed`` holds every garden's workers (other gardens' claims count as
    used); ``world`` is the time, the environment's variable names, the ports other programs
    listen on (new workers avoid them) and the garden's history."""
    world = world or Circumstances()
    garden = loaded.garden
    models = loaded.models()
    mine = observed.of_garden(garden.name)
    # A model resized by a lesson (gardenctl.lessons) keeps its declared sizing hash: its
    # running workers keep their place and claim; its dead ones are placed anew, resized.
    resized = {name for name, _ in loaded.overrides}
    declared = {m.name: sizing_hash(m, garden.placement) for m in loaded.declared_models()
                if m.name in resized}
    holdings = [h for h in mine.holdings()
                if not (h.model in resized and _dead(mine, h.worker_id))]
    requests = build_requests(garden, models, estimates, declared)
    placement = place(requests, inventory, garden.placement, holdings,
                      used_by_others(inventory, observed, garden.name))
    desired = desired_workers(garden, models, placement, estimates, mine.ports(),
                              world.busy_ports, declared)
    rollouts = {m.name: ModelRollout(m.replicas, m.rollout.max_unavailable) for m in models}
    steps = reconcile(desired, mine, placement.unplaced, rollouts, world)
    warnings = [w for name in sorted(estimates) for w in _prefixed(name, estimates[name].warnings)]
    warnings += [issue.format() for issue in loaded.warnings]
    warnings += list(inventory.notes)  # e.g. a declared node that is not in the Ray cluster
    warnings += [f"{s.worker_id}: {s.cause}" for s in steps if s.kind == StepKind.WAIT]
    summaries = tuple(summarise(m.name, m.model, m.replicas, estimates[m.name]) for m in models)
    return Plan(
        garden=garden.name,
        garden_file=loaded.path,
        inventory_source=inventory.source,
        fingerprints={
            "garden": loaded.content_hash[:16],
            "inventory": inventory.fingerprint(),
            "observed": mine.fingerprint(),
        },
        steps=steps,
        ledgers=placement.ledgers,
        unplaced=placement.unplaced,
        warnings=tuple(warnings),
        models=summaries,
    )


def _dead(observed: Observed, worker_id: str) -> bool:
    worker = observed.get(worker_id)
    return worker is not None and worker.phase.dead


def summarise(name: str, ref: str, replicas: int, estimate: MemoryEstimate) -> ModelSummary:
    return ModelSummary(
        name=name, model=ref, replicas=replicas,
        tensor_parallel_size=estimate.tensor_parallel_size, max_model_len=estimate.max_model_len,
        min_concurrency=estimate.min_concurrency, kv_bytes_per_token=estimate.kv_bytes_per_token,
        weights_bytes=estimate.weights.bytes, kv_cache_bytes=estimate.kv_cache.bytes,
        activation_bytes=estimate.activation.bytes, cuda_graph_bytes=estimate.cuda_graph.bytes,
        non_torch_bytes=estimate.non_torch.bytes, cuda_context_bytes=estimate.cuda_context.bytes,
        total_bytes=estimate.total_bytes, weights_source=estimate.weights.source,
        memory_source=estimate.memory_source, memory_note=estimate.memory_note,
        vllm_version=estimate.vllm_version, vllm_version_assumed=estimate.vllm_version_assumed,
    )


def _prefixed(name: str, warnings: Sequence[str]) -> list[str]:
    return [f"{name}: {w}" for w in warnings]
