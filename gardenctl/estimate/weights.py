"""Weight bytes per GPU (pure): exact from safetensors headers, else config.json arithmetic, else
the parameter count in the model's name, else a loudly flagged default.

vLLM shards every linear layer, the embedding and the LM head across tensor-parallel ranks, so
a rank holds the total divided by TP (checked on calibration rows 4/5 and 37/39: TP2 vs TP4 of
the same model differ from an exact halving by < 0.3%).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from gardenctl.estimate.architecture import Architecture
from gardenctl.estimate.quantization import (
    MXFP4_HIDDEN_ALIGN,
    MXFP4_INTERMEDIATE_ALIGN,
    WeightFormat,
    pad_to,
)
from gardenctl.estimate.types import ModelMetadata

DEFAULT_PARAMS = 7_000_000_000  # the flagged default when nothing at all is known
# A published count above the config arithmetic by more than this is a part the config does not
# describe (gemma-3-27b's vision tower is 1.4%); below it, rounding of the published number.
PUBLISHED_SLACK = 0.005
# Parameter counts in names: "7B", "0.5B", "135M", "8x7B", "30B-A3B" (the total comes first).
_NAME_PARAMS = re.compile(r"(?<![A-Za-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)([BbMm])(?![A-Za-z0-9])")
_NAME_4BIT = re.compile(r"awq|gptq|int4|4bit|w4a16|nf4|bnb|mxfp4|q4", re.IGNORECASE)
_NAME_8BIT = re.compile(r"fp8|int8|8bit|w8a8|w8a16", re.IGNORECASE)
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of each part of a model, from config.json arithmetic."""

    embedding: int
    lm_head: int
    attention: int
    dense_mlp: int
    experts: int  # routed experts, all MoE layers
    shared: int  # shared (always-on) experts, all MoE layers
    routers: int
    norms: int
    vision: int = 0
    remainder: int = 0  # published count minus arithmetic (parts the config does not describe)

    @property
    def total(self) -> int:
        return (
            self.embedding
            + self.lm_head
            + self.attention
            + self.dense_mlp
            + self.experts
            + self.shared
            + self.routers
            + self.norms
            + self.vision
            + self.remainder
        )


@dataclass(frozen=True)
class WeightsResult:
    total_bytes: int  # all ranks together
    source: str
    kind: str  # "exact" | "config" | "name" | "default"
    warnings: tuple[str, ...] = ()


def count_params(arch: Architecture, published: int | None = None) -> ParamCounts | None:
    """Parameters from the config's numbers; None if the basic sizes are missing."""
    h, layers, vocab = arch.hidden, arch.layers, arch.vocab
    if not (h and layers and vocab and arch.heads and arch.head_dim):
        return None
    attention = layers * _attention_params(arch)
    mlp_width = 3 if arch.gated_mlp else 2
    dense_layers = arch.dense_layers if arch.is_moe else layers
    dense = dense_layers * mlp_width * h * (arch.intermediate or 0)
    experts = shared = routers = 0
    if arch.is_moe:
        experts = arch.moe_layers * arch.experts * 3 * h * (arch.expert_intermediate or 0)
        shared_width = arch.shared_expert_intermediate + arch.shared_experts * (
            arch.expert_intermediate or 0
        )
        shared = arch.moe_layers * 3 * h * shared_width
        routers = arch.moe_layers * h * arch.experts
    counts = ParamCounts(
        embedding=vocab * h,
        lm_head=0 if arch.tied_embeddings else vocab * h,
        attention=attention,
        dense_mlp=dense,
        experts=experts,
        shared=shared,
        routers=routers,
        norms=(2 * layers + 1) * h,
        vision=_vision_params(arch),
    )
    if published and published > counts.total * (1 + PUBLISHED_SLACK):
        # Whatever the config does not describe (a vision tower with no vision_config) is
        # counted from the published total, never dropped.
        return _with_remainder(counts, arch, published - counts.total)
    return counts


def infer_missing_widths(arch: Architecture, published: int | None) -> tuple[Architecture, str]:
    """Fill an MLP or expert width that config.json leaves out from the published parameter count.

    The built-in catalog lacks intermediate_size for gpt-oss, for instance: with the published
    total, the experts' share and thus their width follow (gpt-oss-120b: 2,880, as published).
    """
    missing_expert = arch.is_moe and not arch.expert_intermediate
    missing_dense = not arch.is_moe and not arch.intermediate
    if not published or not (missing_expert or missing_dense) or not (arch.hidden and arch.layers):
        return arch, ""
    counts = count_params(arch)
    if counts is None or published <= counts.total:
        return arch, ""
    spare = published - counts.total
    if missing_expert:
        per_unit = arch.moe_layers * (arch.experts + arch.shared_experts) * 3 * arch.hidden
        width = _round_width(spare / per_unit) if per_unit else 0
        filled = replace(arch, expert_intermediate=width)
        return filled, f"expert width {width:,} derived from the published parameter count"
    per_unit = arch.layers * (3 if arch.gated_mlp else 2) * arch.hidden
    width = _round_width(spare / per_unit)
    filled = replace(arch, intermediate=width)
    return filled, f"MLP width {width:,} derived from the published parameter count"


def _round_width(width: float) -> int:
    return max(64, round(width / 64) * 64)


def _attention_params(arch: Architecture) -> int:
    h, heads = arch.hidden or 0, arch.heads or 0
    if arch.is_mla:
        rope = arch.qk_rope_head_dim or 64
        nope = arch.qk_nope_head_dim or 128
        v_dim = arch.v_head_dim or 128
        q = h * heads * (nope + rope)
        if arch.q_lora_rank:
            q = h * arch.q_lora_rank + arch.q_lora_rank * heads * (nope + rope)
        kv_a = h * ((arch.kv_lora_rank or 0) + rope)
        kv_b = (arch.kv_lora_rank or 0) * heads * (nope + v_dim)
        return q + kv_a + kv_b + heads * v_dim * h
    head_dim, kv_heads = arch.head_dim or 0, arch.kv_heads or heads
    return h * head_dim * (2 * heads + 2 * kv_heads)


def _vision_params(arch: Architecture) -> int:
    vision = arch.vision
    if not vision:
        return 0
    width = vision.get("hidden_size") or vision.get("width") or vision.get("embed_dim")
    depth = vision.get("num_hidden_layers") or vision.get("depth") or vision.get("num_layers")
    if not (isinstance(width, int) and isinstance(depth, int)):
        return 0
    inner = vision.get("intermediate_size") or 4 * width
    patch = vision.get("patch_size") or 14
    per_layer = 4 * width * width + 2 * width * inner
    projector = width * (arch.hidden or width) * 2
    return depth * per_layer + 3 * patch * patch * width + projector


def _with_remainder(counts: ParamCounts, arch: Architecture, extra: int) -> ParamCounts:
    if arch.is_moe and not arch.expert_intermediate:
        return replace(counts, experts=counts.experts + extra)
    if not arch.is_moe and not arch.intermediate:
        return replace(counts, dense_mlp=counts.dense_mlp + extra)
    if arch.multimodal and not counts.vision:
        return replace(counts, vision=extra)
    return replace(counts, remainder=extra)


def config_weight_bytes(
    arch: Architecture, counts: ParamCounts, fmt: WeightFormat, tp: int = 1
) -> int:
    """Bytes of all ranks together for ``counts`` stored as ``fmt``."""
    linear = counts.attention + counts.dense_mlp + counts.shared
    expert_bytes = counts.experts * fmt.expert_bytes * expert_padding(arch, fmt, tp)
    kept = (
        counts.embedding
        + counts.lm_head
        + counts.routers
        + counts.norms
        + counts.vision
        + counts.remainder
    )
    return math.ceil(linear * fmt.linear_bytes + expert_bytes + kept * fmt.dtype_bytes)


def expert_padding(arch: Architecture, fmt: WeightFormat, tp: int) -> float:
    """Growth of the expert tensors once vLLM pads them for its MXFP4 MoE kernels (1.0 if none)."""
    h, i = arch.hidden, arch.expert_intermediate
    if not (fmt.pad_mxfp4_experts and arch.is_moe and h and i):
        return 1.0
    per_rank = pad_to(-(-i // tp), MXFP4_INTERMEDIATE_ALIGN)
    return pad_to(h, MXFP4_HIDDEN_ALIGN) * per_rank * tp / (h * i)


def describe_counts(counts: ParamCounts, arch: Architecture) -> str:
    parts = [f"{_billions(counts.total)} params"]
    if arch.is_moe:
        parts.append(f"MoE {arch.experts} experts ({_billions(counts.experts)} in experts)")
    if arch.is_mla:
        parts.append("MLA")
    if arch.tied_embeddings:
        parts.append("tied embeddings")
    if counts.vision:
        parts.append(f"vision {_billions(counts.vision)}")
    if counts.remainder:
        parts.append(f"{_billions(counts.remainder)} beyond the config's numbers (published count)")
    return ", ".join(parts)


def estimate_weights(
    model: str,
    metadata: ModelMetadata,
    arch: Architecture | None,
    fmt: WeightFormat,
    tp: int,
    width_note: str = "",
) -> WeightsResult:
    """Weight bytes of all ranks together, from the best source available.

    ``arch`` should already have its missing widths filled (`infer_missing_widths`), which
    ``width_note`` then describes.
    """
    checkpoint_quantized = bool(arch and arch.quantization)
    online = fmt.quantized and not checkpoint_quantized
    if metadata.safetensors_bytes is not None and not online:
        total, mix = exact_weight_bytes(metadata, fmt.dtype_bytes, convert=not checkpoint_quantized)
        source = f"exact: {metadata.safetensors_source} ({mix})"
        counts = count_params(arch) if arch else None
        padding = expert_padding(arch, fmt, tp) if arch else 1.0
        if counts and padding > 1.0:
            extra = int(counts.experts * fmt.expert_bytes * (padding - 1.0))
            total += extra
            source += f" + {extra / 1024**3:.2f} GiB mxfp4 expert padding (vLLM MoE kernel layout)"
        return WeightsResult(total, source, "exact")
    counts = count_params(arch, metadata.published_params) if arch else None
    if arch and counts:
        warnings: tuple[str, ...] = ()
        if online and metadata.safetensors_bytes is not None:
            warnings = (
                f"weights: {fmt.description}; the checkpoint's headers describe the "
                "unquantized tensors, so the size comes from config arithmetic",
            )
        described = describe_counts(counts, arch) + (f" ({width_note})" if width_note else "")
        source = f"{metadata.config_source or 'config.json'}: {described}; "
        return WeightsResult(
            config_weight_bytes(arch, counts, fmt, tp), source + fmt.description, "config", warnings
        )
    per_param, per_param_label = name_bytes_per_param(model, fmt)
    if metadata.published_params:
        total = int(metadata.published_params * per_param)
        source = (
            f"{metadata.published_params_source}: {_billions(metadata.published_params)} "
            f"params x {per_param_label}"
        )
        return WeightsResult(total, source, "config")
    named = params_from_name(model)
    why = "; ".join(metadata.notes) or "no config.json or safetensors headers were found"
    if named:
        params, text = named
        source = f'guessed from name "{text}": {_billions(params)} params x {per_param_label}'
        warning = (
            f"weights of {model} guessed from its name ({text}): {why}. Give a local folder "
            "or download config.json to get exact numbers."
        )
        return WeightsResult(int(params * per_param), source, "name", (warning,))
    source = (
        f"DEFAULT (nothing known about {model}): {_billions(DEFAULT_PARAMS)} params "
        f"x {per_param_label}"
    )
    warning = (
        f"WEIGHTS ARE A DEFAULT ({_billions(DEFAULT_PARAMS)} params) for {model}: {why}. "
        "This estimate is a placeholder; download the model's config.json or give a "
        "local folder."
    )
    return WeightsResult(int(DEFAULT_PARAMS * per_param), source, "default", (warning,))


def exact_weight_bytes(
    metadata: ModelMetadata, dtype_bytes: int, *, convert: bool = True
) -> tuple[int, str]:
    """Header bytes, with floating tensors counted at the dtype vLLM will load them in."""
    total = 0
    converted = []
    for dtype, n_bytes in sorted(metadata.safetensors_dtypes.items()):
        stored = FLOAT_DTYPES.get(dtype) if convert else None
        if stored and stored != dtype_bytes:
            total += n_bytes * dtype_bytes // stored
            converted.append(f"{dtype} counted at {dtype_bytes} B")
        else:
            total += n_bytes
    if not metadata.safetensors_dtypes:
        total = metadata.safetensors_bytes or 0
    mix = ", ".join(
        f"{d} {n / 1024**3:.2f} GiB" for d, n in sorted(metadata.safetensors_dtypes.items())
    )
    note = f" ({'; '.join(converted)})" if converted else ""
    return total, f"{mix}{note}"


def params_from_name(model: str) -> tuple[float, str] | None:
    """The largest parameter count written in the name, e.g. ("7B", 7e9); None if there is none."""
    best: tuple[float, str] | None = None
    for match in _NAME_PARAMS.finditer(model.rsplit("/", 1)[-1]):
        count, number, unit = match.groups()
        params = float(number) * (1e9 if unit in "Bb" else 1e6) * (int(count) if count else 1)
        if best is None or params > best[0]:
            best = (params, match.group(0))
    return best


def name_bytes_per_param(model: str, fmt: WeightFormat) -> tuple[float, str]:
    """Bytes per parameter implied by the quantization flag or the name's hints ("AWQ", "FP8")."""
    if fmt.quantized:
        return max(fmt.linear_bytes, 0.5625), fmt.scheme
    if _NAME_4BIT.search(model):
        return 0.5625, "4-bit (from the name)"
    if _NAME_8BIT.search(model):
        return 1.0, "8-bit (from the name)"
    return float(fmt.dtype_bytes), f"{fmt.dtype_bytes} B/param"


def _billions(params: int | float) -> str:
    return f"{params / 1e9:.2f}B"
