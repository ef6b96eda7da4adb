"""Sizing a worker from a measured profile instead of the static estimate (pure).

A profile whose key matches exactly (same model, settings, vLLM release and GPU model) is the
truth of the next start: the footprint outside the KV cache is what vLLM measured, and the KV
cache is the measured bytes per token times the tokens the worker must hold. A profile of the
same model and settings on another release or GPU is only a hint: the plan shows it next to the
estimate and sizes from the estimate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from gardenctl.argv import split_argv
from gardenctl.estimate.types import Item, MemoryEstimate
from gardenctl.inventory.model import Inventory
from gardenctl.profiles.model import Profile, ProfileKey, make_key, other_settings
from gardenctl.spec.models import ModelSpec
from gardenctl.units import format_gib
from gardenctl.workers import vllm_argv

# Bytes per token read back from a log carry the rounding of "X.XX GiB" and of whole blocks;
# within this fraction of the model's own figure, the model's exact figure is the one used.
PER_TOKEN_AGREEMENT = 0.005
# Warnings of the static estimate that a measurement makes moot: how the weights and the
# model's dimensions were guessed (gardenctl.estimate.weights and .core word them so).
STATIC_GUESSES = ("weights of ", "KV cache, activations and CUDA graphs of ")


@dataclass(frozen=True)
class ProfileChoice:
    """What the profiles say about one model: the one to size from, and hints."""

    exact: Profile | None
    hints: tuple[Profile, ...]


def choose(profiles: Iterable[Profile], key: ProfileKey) -> ProfileChoice:
    exact = None
    hints = []
    for profile in profiles:
        # Without a known release on both sides nothing is the truth, only a hint.
        if profile.key == key and key.vllm_version and key.gpu_name:
            exact = profile
        elif profile.key.same_setup(key):
            hints.append(profile)
    hints.sort(key=lambda p: (-p.measured_at, p.key))
    return ProfileChoice(exact, tuple(hints))


def measured_note(profile: Profile) -> str:
    day = time.strftime("%Y-%m-%d", time.gmtime(profile.measured_at))
    version = profile.key.vllm_version or "unknown"
    return f"measured on {profile.key.gpu_name or 'unknown GPU'}, vLLM {version}, {day}"


def hint_note(profile: Profile, estimate: MemoryEstimate) -> str:
    return (f"hint only ({measured_note(profile)}; another release or GPU): non-KV "
            f"{format_gib(profile.sizing_non_kv_bytes)} measured there vs "
            f"{format_gib(estimate.budget_bytes - estimate.kv_cache.bytes)} estimated here")


def size_from_profile(estimate: MemoryEstimate, profile: Profile) -> MemoryEstimate:
    """The estimate with its budget items replaced by what ``profile`` measured.

    The non-KV footprint is the profile's (weights as loaded, the rest split into CUDA-graph
    pool, non-torch memory and activation peak); the KV cache keeps the estimate's number of
    tokens (max_model_len x min_concurrency, less what sliding windows save) at the measured
    bytes per token. Items outside the budget (the CUDA context) stay estimated."""
    note = measured_note(profile)
    per_token, per_token_source = _per_token(estimate, profile)
    tokens = estimate.kv_cache.bytes / max(1, estimate.kv_bytes_per_token)
    kv = math.ceil(tokens * per_token)
    graphs_inside = estimate.graphs_in_budget
    graph_bytes = profile.cuda_graph_bytes if profile.cuda_graph_bytes is not None \
        else estimate.cuda_graph.bytes
    non_kv = profile.sizing_non_kv_bytes
    if graphs_inside and not profile.graphs_in_budget:  # a user's run without the variable
        non_kv += graph_bytes
    elif profile.graphs_in_budget and not graphs_inside:
        non_kv = max(0, non_kv - graph_bytes)
    weights = min(profile.weights_bytes, non_kv)
    graph_in = graph_bytes if graphs_inside else 0
    non_torch = min(estimate.non_torch.bytes, max(0, non_kv - weights - graph_in))
    activation = max(0, non_kv - weights - graph_in - non_torch)
    graph_in = non_kv - weights - non_torch - activation if graphs_inside else 0
    samples = f"{profile.samples} start{'s' if profile.samples != 1 else ''}"
    return replace(
        estimate,
        kv_bytes_per_token=per_token,
        kv_bytes_per_token_source=per_token_source,
        weights=Item(weights, f"measured: 'Model loading took {format_gib(profile.weights_bytes)}' "
                              f"({note})"),
        kv_cache=Item(kv, f"{per_token:,} B/token ({per_token_source}) x "
                          f"{math.ceil(tokens):,} tokens"),
        activation=Item(activation, f"{note}: non-KV {format_gib(non_kv)} ({samples}, the largest) "
                                    f"less weights, graphs and non-torch"),
        cuda_graph=Item(graph_in if graphs_inside else graph_bytes,
                        f"{note}: graph pool {format_gib(graph_bytes)}"
                        + ("" if graphs_inside else " (outside the budget in this release)")
                        + (f", {format_gib(profile.graph_overflow_bytes)} of it beyond vLLM's "
                           f"estimate, outside the budget"
                           if graphs_inside and profile.graph_overflow_bytes else "")),
        non_torch=Item(non_torch, estimate.non_torch.source),
        graph_overflow_bytes=profile.graph_overflow_bytes if graphs_inside else 0,
        memory_source="measured",
        memory_note=note,
        warnings=tuple(w for w in estimate.warnings if not w.startswith(STATIC_GUESSES)),
    )


def _per_token(estimate: MemoryEstimate, profile: Profile) -> tuple[int, str]:
    measured = profile.kv_bytes_per_token
    exact = estimate.kv_bytes_per_token
    if exact and abs(measured - exact) <= PER_TOKEN_AGREEMENT * exact:
        return exact, f"the model's figure, confirmed by {measured:,} B/token measured"
    return measured, (f"measured: {format_gib(profile.kv_cache_bytes)} for "
                      f"{profile.kv_cache_tokens:,} tokens; the model's layout gave {exact:,}")


def keys_summary(profiles: Sequence[Profile]) -> list[str]:
    return [p.key.describe() for p in profiles]




def gpu_name_for(model: ModelSpec, inventory: Inventory) -> str | None:
    """The GPU model a worker of ``model`` will run on, when the inventory leaves one choice
    (a node of one GPU model, or a pin to such GPUs); None when it could land on several."""
    pin = model.placement
    names = {gpu.name for gpu in inventory.gpus
             if (pin is None or pin.node is None or gpu.node == pin.node)
             and (pin is None or pin.gpus is None or gpu.index in pin.gpus)}
    return names.pop() if len(names) == 1 else None


def profile_key(model: ModelSpec, vllm_version: str | None, gpu_name: str | None) -> ProfileKey:
    """The key a worker of ``model`` will be learned under (gardenctl.profiles.learn.key_of
    reads the same from the worker's argv and environment)."""
    argv = vllm_argv(model, port=0, utilization=0.0, max_model_len=1)
    return make_key(
        model=model.model, revision=model.revision, vllm_version=vllm_version,
        gpu_name=gpu_name, tensor_parallel_size=model.tensor_parallel_size, dtype=model.dtype,
        quantization=model.quantization, kv_cache_dtype=model.kv_cache_dtype,
        max_num_seqs=model.max_num_seqs, max_num_batched_tokens=model.max_num_batched_tokens,
        enforce_eager=model.enforce_eager,
        other=other_settings(split_argv(argv)[1], model.env))


def sized_estimates(models: Sequence[ModelSpec], estimates: Mapping[str, MemoryEstimate],
                    inventory: Inventory, profiles: Sequence[Profile]
                    ) -> Mapping[str, MemoryEstimate]:
    """Each model's estimate, replaced by a measured sizing where a profile matches exactly;
    a profile of the same setup on another release or GPU only adds a hint to the note."""
    result = dict(estimates)
    if not profiles:
        return result
    for model in models:
        estimate = estimates[model.name]
        gpu_name = gpu_name_for(model, inventory)
        version = None if estimate.vllm_version_assumed else estimate.vllm_version
        choice = choose(profiles, profile_key(model, version, gpu_name))
        if choice.exact is not None:
            result[model.name] = size_from_profile(estimate, choice.exact)
        elif choice.hints:
            result[model.name] = replace(estimate, memory_note=hint_note(choice.hints[0],
                                                                         estimate))
    return result
