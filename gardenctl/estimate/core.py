"""`estimate_memory`: from a request and the model's metadata to an itemised per-GPU estimate.

Pure: no I/O, no clock, no logging. Every item carries the source of its number; anything
assumed rather than read (a default max_model_len, weights guessed from a name, dimensions of
a "typical" model) also lands in `warnings`, so that a person sees it before trusting the plan.
"""

from __future__ import annotations

import math
from dataclasses import replace

from gardenctl.errors import GardenError
from gardenctl.estimate.architecture import FULL, Architecture, read_architecture
from gardenctl.estimate.baselines import model_garden_estimate, ndif_estimate
from gardenctl.estimate.kv_cache import (
    KV_DTYPE_BYTES,
    kv_dtype_bytes,
    kv_layout,
    kv_sequence_bytes,
    sliding_saving,
)
from gardenctl.estimate.overheads import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    estimate_activation,
    estimate_cuda_context,
    estimate_cuda_graphs,
    estimate_non_torch,
)
from gardenctl.estimate.quantization import weight_format
from gardenctl.estimate.releases import NEWEST, ReleaseTraits, traits_for
from gardenctl.estimate.types import EstimateRequest, Item, MemoryEstimate, ModelMetadata
from gardenctl.estimate.weights import (
    DEFAULT_PARAMS,
    estimate_weights,
    infer_missing_widths,
    params_from_name,
)

ESTIMATORS = ("gardenctl", "model-garden", "ndif")
DEFAULT_MAX_MODEL_LEN = 4096
DTYPE_BYTES = {
    "half": 2,
    "float16": 2,
    "fp16": 2,
    "bfloat16": 2,
    "bf16": 2,
    "float": 4,
    "float32": 4,
}
V0_DEFAULT_BATCHED = 2048  # V0 SchedulerConfig's _DEFAULT_MAX_NUM_BATCHED_TOKENS
V0_LONG_CONTEXT = 32768  # V0 enables chunked prefill for longer max_model_len
GUESSED_VOCAB = 152064  # a large modern vocabulary (Qwen2.5): the sampler term errs high


def estimate_memory(
    request: EstimateRequest, metadata: ModelMetadata, estimator: str = "gardenctl"
) -> MemoryEstimate:
    """Memory one worker needs on each of its GPUs; see `MemoryEstimate` for the items."""
    _check_request(request, estimator)
    traits, _, release_note = traits_for(request.vllm_version)
    version = request.vllm_version or NEWEST.newest_label

    def stamped(result: MemoryEstimate) -> MemoryEstimate:
        return replace(
            result,
            vllm_version=version,
            vllm_version_assumed=request.vllm_version is None,
            vllm_range=traits.label,
            graphs_in_budget=traits.graphs_in_budget,
        )

    if estimator == "model-garden":
        return stamped(model_garden_estimate(request, metadata))
    tp = request.tensor_parallel_size
    arch = read_architecture(metadata.config) if metadata.config else None
    width_note = ""
    if arch is not None:
        arch, width_note = infer_missing_widths(arch, metadata.published_params)
    dtype_bytes, dtype_label = _model_dtype(request.dtype, arch)
    fmt = weight_format(arch.quantization if arch else None, request.quantization, dtype_bytes)
    weights = estimate_weights(request.model, metadata, arch, fmt, tp, width_note)
    if estimator == "ndif":
        return stamped(ndif_estimate(request, weights.total_bytes, weights.source))

    warnings = list(weights.warnings)
    if release_note:
        warnings.append(release_note)
    usable = arch if arch is not None and _is_complete(arch) else None
    if usable is None:
        params = _params_for_guess(request.model, metadata)
        usable = guessed_architecture(params)
        why = "its config.json lacks the needed sizes" if arch else "no config.json was found"
        warnings.append(
            f"KV cache, activations and CUDA graphs of {request.model} use the dimensions of a "
            f"typical dense {params / 1e9:.1f}B model (MHA, upper bound) because {why}."
        )
        origin = f"guessed (typical {params / 1e9:.1f}B dense model, MHA upper bound)"
    else:
        origin = metadata.config_source or "config.json"

    max_model_len, len_source = _max_model_len(request, arch, metadata, warnings)
    kv_dtype = request.kv_cache_dtype or "auto"
    element = kv_dtype_bytes(kv_dtype, dtype_bytes)
    kv_label = f"auto = {dtype_label}" if kv_dtype == "auto" else kv_dtype
    layout = kv_layout(usable, tp, element, kv_label)
    if usable.heads and tp > 1 and usable.heads % tp:
        warnings.append(
            f"{usable.heads} attention heads are not divisible by TP {tp}: vLLM refuses"
        )
    batched, assumed = _batched_tokens(request, traits, max_model_len)
    per_sequence = kv_sequence_bytes(layout, max_model_len, batched)
    concurrency = request.min_concurrency
    kv_source = (
        f"{layout.bytes_per_token:,} B/token x {max_model_len:,} tokens x {concurrency} "
        f"sequence{'s' if concurrency != 1 else ''}{sliding_saving(layout, max_model_len, batched)}"
    )

    seqs = request.max_num_seqs or traits.default_max_num_seqs
    activation = estimate_activation(usable, tp, dtype_bytes, batched, seqs, assumed, traits)
    graphs = estimate_cuda_graphs(usable, request.enforce_eager, traits)
    non_torch = estimate_non_torch(tp, traits)
    context = estimate_cuda_context(tp, traits)
    tp_note = f" / TP {tp}" if tp > 1 else ""
    estimate = MemoryEstimate(
        estimator=estimator,
        model=request.model,
        tensor_parallel_size=tp,
        max_model_len=max_model_len,
        max_model_len_source=len_source,
        min_concurrency=concurrency,
        kv_bytes_per_token=layout.bytes_per_token,
        kv_bytes_per_token_source=f"{origin}: {layout.description}",
        weights=Item(math.ceil(weights.total_bytes / tp), weights.source + tp_note),
        kv_cache=Item(per_sequence * concurrency, kv_source),
        activation=Item(activation.bytes, activation.source),
        cuda_graph=Item(graphs.bytes, graphs.source),
        non_torch=Item(non_torch.bytes, non_torch.source),
        cuda_context=Item(context.bytes, context.source),
        warnings=tuple(warnings),
    )
    return stamped(estimate)


def _batched_tokens(
    request: EstimateRequest, traits: ReleaseTraits, max_model_len: int
) -> tuple[int, str]:
    """Tokens of the profile run and, when not requested, what default was assumed."""
    if request.max_num_batched_tokens:
        return request.max_num_batched_tokens, ""
    if traits.default_max_num_batched_tokens is not None:
        if traits.default_max_num_batched_tokens == DEFAULT_MAX_NUM_BATCHED_TOKENS:
            return DEFAULT_MAX_NUM_BATCHED_TOKENS, " (assumed: vLLM's H100 default)"
        return traits.default_max_num_batched_tokens, f" (assumed: vLLM {traits.label} default)"
    # V0 without chunked prefill profiles a whole max_model_len prompt (at least 2048 tokens);
    # above 32K tokens V0 turns chunked prefill on, with 2048-token chunks.
    if max_model_len > V0_LONG_CONTEXT:
        return V0_DEFAULT_BATCHED, " (assumed: V0 chunked prefill above 32K tokens)"
    return max(max_model_len, V0_DEFAULT_BATCHED), " (assumed: V0 max(max_model_len, 2048))"


def guessed_architecture(params: float) -> Architecture:
    """A typical dense decoder of ``params`` parameters, with MHA (the largest KV cache)."""
    layers = max(8, round(32 * (params / 7e9) ** (1 / 3)))
    hidden = max(512, 512 * round(math.sqrt(params / (12 * layers)) / 512))
    return Architecture(
        name="guessed",
        layers=layers,
        hidden=hidden,
        heads=hidden // 128,
        kv_heads=hidden // 128,
        head_dim=128,
        intermediate=128 * round(hidden * 8 / 3 / 128),
        vocab=GUESSED_VOCAB,
        tied_embeddings=False,
        gated_mlp=True,
        experts=0,
        experts_per_token=0,
        expert_intermediate=None,
        shared_expert_intermediate=0,
        shared_experts=0,
        dense_layers=0,
        kv_lora_rank=None,
        qk_rope_head_dim=None,
        qk_nope_head_dim=None,
        v_head_dim=None,
        q_lora_rank=None,
        layer_kinds=(FULL,) * layers,
        sliding_window=None,
        attention_chunk_size=None,
        context_limit=None,
        context_limit_key=None,
        torch_dtype=None,
        multimodal=False,
        vision=None,
        quantization=None,
    )


def _check_request(request: EstimateRequest, estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise GardenError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    if request.tensor_parallel_size < 1:
        raise GardenError(f"tensor_parallel_size must be >= 1, got {request.tensor_parallel_size}")
    if request.min_concurrency < 1:
        raise GardenError(f"min_concurrency must be >= 1, got {request.min_concurrency}")
    if request.max_model_len is not None and request.max_model_len < 1:
        raise GardenError(f"max_model_len must be >= 1, got {request.max_model_len}")
    if request.dtype not in ("auto", *DTYPE_BYTES):
        raise GardenError(
            f"unknown dtype {request.dtype!r}; use auto, {', '.join(sorted(DTYPE_BYTES))}"
        )
    if request.kv_cache_dtype not in ("auto", *KV_DTYPE_BYTES):
        raise GardenError(
            f"unknown kv_cache_dtype {request.kv_cache_dtype!r}; use auto, "
            f"{', '.join(sorted(KV_DTYPE_BYTES))}"
        )


def _model_dtype(dtype: str, arch: Architecture | None) -> tuple[int, str]:
    """Bytes of the dtype vLLM computes in: `auto` takes config.json's, fp32 becomes bf16."""
    if dtype != "auto":
        return DTYPE_BYTES[dtype], dtype
    stored = (arch.torch_dtype if arch else None) or "bfloat16"
    if DTYPE_BYTES.get(stored, 2) == 4:
        return 2, "bfloat16 (vLLM casts float32 checkpoints)"
    return 2, stored


def _is_complete(arch: Architecture) -> bool:
    return bool(
        arch.layers
        and arch.hidden
        and arch.vocab
        and (arch.is_mla or (arch.heads and arch.head_dim))
    )


def _params_for_guess(model: str, metadata: ModelMetadata) -> float:
    if metadata.published_params:
        return float(metadata.published_params)
    if metadata.safetensors_params:
        return float(metadata.safetensors_params)
    named = params_from_name(model)
    return named[0] if named else float(DEFAULT_PARAMS)


def _max_model_len(
    request: EstimateRequest,
    arch: Architecture | None,
    metadata: ModelMetadata,
    warnings: list[str],
) -> tuple[int, str]:
    limit = arch.context_limit if arch else None
    limit_key = arch.context_limit_key if arch else None
    if request.max_model_len is not None:
        if limit and request.max_model_len > limit:
            warnings.append(
                f"max_model_len {request.max_model_len:,} exceeds the model's limit {limit:,} "
                f"({limit_key}); vLLM refuses it unless "
                "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"
            )
        return request.max_model_len, "requested"
    if limit:
        origin = metadata.config_source or "config.json"
        return limit, f"{origin}: {limit_key}"
    why = (
        f"{request.model}'s config.json gives no length"
        if metadata.config is not None
        else f"no config.json of {request.model} was found, so its limit is unknown"
    )
    warnings.append(
        f"max_model_len is a DEFAULT ({DEFAULT_MAX_MODEL_LEN:,}): it was not given and "
        f"{why}; set max_model_len explicitly"
    )
    return DEFAULT_MAX_MODEL_LEN, "DEFAULT: not given and not in config.json"
