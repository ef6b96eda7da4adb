"""KV-cache bytes per token and per sequence on one GPU (pure), as vLLM allocates them.

Rules checked against vLLM 0.19 start-up logs (model-configs.json `kv_check`, within 0.1%) and
vLLM's `kv_cache_utils.py` / `kv_cache_interface.py`:
- standard attention: 2 (K and V) x layers x max(1, kv_heads // TP) x head_dim x dtype bytes;
- MLA (DeepSeek-V2/V3, Kimi): layers x (kv_lora_rank + qk_rope_head_dim) x dtype bytes, the same
  latent on every rank (not divided by TP); `fp8_ds_mla` stores 656 B per layer and token;
- hybrid models (sliding-window or chunked layers beside full ones) are cut into groups of equal
  size (the smallest kind's layer count, or the largest when it is < 1.5x the smallest) and each
  kind is padded to whole groups: gemma-3-27b's 10 full + 52 sliding layers take 70 slots;
- one sequence of max_model_len needs cdiv(len, block) blocks in full layers, and
  cdiv(min(window - 1 + max_num_batched_tokens, len), block) + 1 blocks in sliding layers, so a
  sliding window saves nothing once max_num_batched_tokens >= max_model_len. Chunked-local layers
  (Llama-4) are counted like full layers: vLLM can turn their hybrid grouping off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gardenctl.estimate.architecture import CHUNKED, FULL, SLIDING, Architecture

BLOCK_SIZE = 16  # vLLM's default --block-size (tokens per KV block) on CUDA
FP8_DS_MLA_BYTES_PER_LAYER = 656
KV_DTYPE_BYTES = {
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp8_inc": 1,
    "fp8_ds_mla": 1,
    "int8": 1,
    "half": 2,
    "float16": 2,
    "bfloat16": 2,
    "float": 4,
    "float32": 4,
}


@dataclass(frozen=True)
class KvLayout:
    """How one GPU stores the KV cache of one token."""

    per_layer_bytes: int  # one token, one layer slot
    slots: tuple[tuple[str, int], ...]  # (kind, layer slots incl. padding), sorted by kind
    sliding_window: int | None
    description: str

    @property
    def bytes_per_token(self) -> int:
        return self.per_layer_bytes * sum(n for _, n in self.slots)


def kv_dtype_bytes(kv_cache_dtype: str, model_dtype_bytes: int) -> int:
    """Bytes per KV element: `auto` follows the model's (activation) dtype."""
    if kv_cache_dtype in ("auto", "", None):
        return model_dtype_bytes
    try:
        return KV_DTYPE_BYTES[kv_cache_dtype]
    except KeyError:
        raise ValueError(
            f"unknown kv_cache_dtype {kv_cache_dtype!r}; use auto, "
            + ", ".join(sorted(KV_DTYPE_BYTES))
        ) from None


def kv_layout(arch: Architecture, tp: int, element_bytes: int, kv_cache_dtype: str) -> KvLayout:
    """Per-token KV bytes on one GPU for ``arch`` at tensor parallelism ``tp``."""
    layers = arch.layers or 0
    dtype_note = f"{element_bytes} B ({kv_cache_dtype})"
    if arch.is_mla:
        latent = (arch.kv_lora_rank or 0) + (arch.qk_rope_head_dim or 0)
        if kv_cache_dtype == "fp8_ds_mla":
            per_layer = FP8_DS_MLA_BYTES_PER_LAYER
            how = f"{layers} layers x {per_layer} B (fp8_ds_mla)"
        else:
            per_layer = latent * element_bytes
            how = (
                f"MLA: {layers} layers x (kv_lora_rank {arch.kv_lora_rank} + qk_rope_head_dim "
                f"{arch.qk_rope_head_dim}) x {dtype_note}, the same on every rank"
            )
        return KvLayout(per_layer, ((FULL, layers),), None, how)
    kv_heads = arch.kv_heads or arch.heads or 1
    per_rank = max(1, kv_heads // tp)
    per_layer = 2 * per_rank * (arch.head_dim or 0) * element_bytes
    heads_note = (
        f"{kv_heads} KV heads" if tp == 1 else f"{kv_heads} KV heads / TP {tp} = {per_rank}"
    )
    slots, grouping = _group_slots(arch.layer_kinds or (FULL,) * layers)
    padded = sum(n for _, n in slots)
    layer_note = f"{layers} layers" if padded == layers else f"{layers} layers in {padded} slots"
    how = f"2 x {layer_note} x {heads_note} x {arch.head_dim} head dim x {dtype_note}{grouping}"
    window = arch.sliding_window if any(kind == SLIDING for kind, _ in slots) else None
    return KvLayout(per_layer, slots, window, how)


def _group_slots(kinds: tuple[str, ...]) -> tuple[tuple[tuple[str, int], ...], str]:
    counts = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
    if len(counts) == 1:
        return tuple(counts.items()), ""
    smallest, largest = min(counts.values()), max(counts.values())
    group = largest if largest < smallest * 1.5 else smallest
    slots = tuple((kind, math.ceil(n / group) * group) for kind, n in counts.items())
    padding = sum(n for _, n in slots) - len(kinds)
    mix = " + ".join(f"{n} {kind}" for kind, n in counts.items())
    return slots, f" (hybrid: {mix} in groups of {group}, {padding} padding layers)"


def kv_sequence_bytes(layout: KvLayout, max_model_len: int, max_num_batched_tokens: int) -> int:
    """Bytes one sequence of ``max_model_len`` tokens holds on one GPU."""
    full_tokens = math.ceil(max_model_len / BLOCK_SIZE) * BLOCK_SIZE
    total = 0
    for kind, slots in layout.slots:
        tokens = full_tokens
        if kind == SLIDING and layout.sliding_window:
            needed = min(layout.sliding_window - 1 + max_num_batched_tokens, max_model_len)
            tokens = (math.ceil(needed / BLOCK_SIZE) + 1) * BLOCK_SIZE
        elif kind == CHUNKED:
            tokens = full_tokens
        total += slots * tokens * layout.per_layer_bytes
    return total


def sliding_saving(layout: KvLayout, max_model_len: int, max_num_batched_tokens: int) -> str:
    """A phrase for the source: whether the sliding window saved anything."""
    if not layout.sliding_window:
        return ""
    if max_num_batched_tokens + layout.sliding_window - 1 >= max_model_len:
        return (
            f"; sliding window {layout.sliding_window} saves nothing (max_num_batched_tokens "
            f"{max_num_batched_tokens:,} >= max_model_len)"
        )
    return (
        f"; sliding layers hold window {layout.sliding_window} - 1 + max_num_batched_tokens "
        f"{max_num_batched_tokens:,} tokens"
    )
