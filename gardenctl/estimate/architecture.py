"""The numbers of a model's architecture, read from its config.json (a pure function of a dict).

`read_architecture(config)` turns a Hugging Face config.json (or the built-in catalog's copy of
one) into an `Architecture`: layers, heads, head dim, MLP and MoE sizes, MLA ranks, which layers
use sliding-window or chunked attention, the context limit. Multimodal configs keep the language
model's numbers under `text_config` (or `llm_config` / `language_config`); those win over the
top-level keys. A number the config does not give is None: callers say so in their sources.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gardenctl.errors import ModelMetadataError

TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config")

# Dense MLPs without a gate (two matrices, not three): GPT-2 style blocks.
UNGATED_MLP_ARCHITECTURES = (
    "PhiForCausalLM",
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
    "GPTBigCodeForCausalLM",
    "GPTJForCausalLM",
    "FalconForCausalLM",
    "Starcoder2ForCausalLM",
    "OPTForCausalLM",
    "BloomForCausalLM",
    "MPTForCausalLM",
)
# Families whose config.json leaves tie_word_embeddings out because their default is True.
TIED_BY_DEFAULT = ("gemma", "Gemma")

# Keys vLLM reads for a model's context limit (it takes the smallest one present).
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# rope_scaling types whose length vLLM does not multiply (`_get_and_verify_max_len`).
ROPE_TYPES_ALREADY_EXTENDED = ("su", "longrope", "llama3")

# Sane ranges of config.json numbers (inclusive): a value outside is a broken or hostile file,
# refused before any arithmetic (a per-layer table of 10**12 layers would be a MemoryError).
# The bounds are far above any published model (Llama-4 Scout: 10M positions; vocabularies of
# 262K; 256 routed experts; 128 layers).
CONFIG_BOUNDS: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, 4096),
    "n_layer": (1, 4096),
    "num_layers": (1, 4096),
    "n_layers": (1, 4096),
    "hidden_size": (1, 1 << 20),
    "n_embd": (1, 1 << 20),
    "d_model": (1, 1 << 20),
    "num_attention_heads": (1, 1 << 16),
    "n_head": (1, 1 << 16),
    "num_heads": (1, 1 << 16),
    "num_key_value_heads": (1, 1 << 16),
    "num_kv_heads": (1, 1 << 16),
    "head_dim": (1, 1 << 16),
    "intermediate_size": (1, 1 << 24),
    "moe_intermediate_size": (1, 1 << 24),
    "vocab_size": (1, 1 << 26),
    "num_local_experts": (0, 1 << 16),
    "num_experts": (0, 1 << 16),
    "n_routed_experts": (0, 1 << 16),
    "num_experts_per_tok": (0, 1 << 16),
    "sliding_window": (0, 1 << 32),
    "attention_chunk_size": (0, 1 << 32),
    **dict.fromkeys(CONTEXT_KEYS, (1, 1 << 32)),
}
MAX_ROPE_FACTOR = 1 << 12


@dataclass(frozen=True)
class OutOfRange:
    key: str  # as found, e.g. "text_config.num_hidden_layers"
    value: Any
    low: float
    high: float


def config_out_of_range(config: Mapping[str, Any]) -> list[OutOfRange]:
    """The numbers of ``config`` (top level and text config) outside CONFIG_BOUNDS, and a
    rope_scaling factor that is not a finite number in (0, MAX_ROPE_FACTOR]."""
    bad: list[OutOfRange] = []
    scopes: list[tuple[str, Mapping[str, Any]]] = [("", config)]
    scopes += [(f"{k}.", v) for k in TEXT_CONFIG_KEYS if isinstance(v := config.get(k), Mapping)]
    for prefix, scope in scopes:
        for key, (low, high) in CONFIG_BOUNDS.items():
            value = scope.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not (math.isfinite(value) and low <= value <= high):
                bad.append(OutOfRange(prefix + key, value, low, high))
        scaling = scope.get("rope_scaling")
        if isinstance(scaling, Mapping) and "factor" in scaling:
            factor = scaling["factor"]
            if not (_finite(factor) and factor <= MAX_ROPE_FACTOR):
                bad.append(OutOfRange(prefix + "rope_scaling.factor", factor, 0, MAX_ROPE_FACTOR))
    return bad


FULL = "full"
SLIDING = "sliding"
CHUNKED = "chunked"


@dataclass(frozen=True)
class Architecture:
    """What the memory estimate needs from config.json; None where the config is silent."""

    name: str  # architectures[0], else model_type, else "unknown"
    layers: int | None
    hidden: int | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    intermediate: int | None  # dense MLP width (also the dense layers of a MoE model)
    vocab: int | None
    tied_embeddings: bool
    gated_mlp: bool
    experts: int  # routed experts per MoE layer; 0 for a dense model
    experts_per_token: int
    expert_intermediate: int | None
    shared_expert_intermediate: int  # width of an explicitly sized shared expert (Qwen2-MoE)
    shared_experts: int  # always-on experts as wide as a routed one (DeepSeek, Llama-4)
    dense_layers: int  # layers of a MoE model that keep a dense MLP
    kv_lora_rank: int | None  # MLA (DeepSeek-V2/V3, Kimi)
    qk_rope_head_dim: int | None
    qk_nope_head_dim: int | None
    v_head_dim: int | None
    q_lora_rank: int | None
    layer_kinds: tuple[str, ...]  # FULL | SLIDING | CHUNKED, one per layer ("" when unknown)
    sliding_window: int | None
    attention_chunk_size: int | None
    context_limit: int | None  # vLLM's derived max_model_len
    context_limit_key: str | None
    torch_dtype: str | None
    multimodal: bool
    vision: Mapping[str, Any] | None
    quantization: Mapping[str, Any] | None

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def moe_layers(self) -> int:
        return max(0, (self.layers or 0) - self.dense_layers) if self.is_moe else 0


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's keys, falling back to the top level for what they leave out."""
    for key in TEXT_CONFIG_KEYS:
        nested = config.get(key)
        if isinstance(nested, Mapping):
            merged = {k: v for k, v in config.items() if k not in TEXT_CONFIG_KEYS}
            merged.update({k: v for k, v in nested.items() if v is not None})
            return merged
    return config


def read_architecture(config: Mapping[str, Any]) -> Architecture:
    """Read the numbers of ``config`` (a parsed config.json); never raises on missing keys.
    Raises ModelMetadataError for numbers outside CONFIG_BOUNDS (see config_out_of_range)."""
    bad = config_out_of_range(config)
    if bad:
        shown = ", ".join(f"{b.key} = {_shown(b.value)}" for b in bad[:3])
        raise ModelMetadataError(f"config.json values out of any sane range: {shown}")
    cfg = text_config(config)
    multimodal = any(isinstance(config.get(k), Mapping) for k in TEXT_CONFIG_KEYS) or (
        isinstance(config.get("vision_config"), Mapping)
    )
    architectures = config.get("architectures") or cfg.get("architectures") or []
    name = str(architectures[0]) if architectures else str(cfg.get("model_type") or "unknown")

    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model", "dim")
    heads = _int(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")
    kv_heads = _int(
        cfg, "num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"
    )
    if kv_heads is None:
        kv_heads = 1 if cfg.get("multi_query") else heads
    head_dim = _int(cfg, "head_dim", "attention_head_dim")
    if head_dim is None and hidden and heads:
        head_dim = hidden // heads

    experts = (
        _int(cfg, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts") or 0
    )
    experts_per_token = (
        _int(cfg, "num_experts_per_tok", "experts_per_token", "moe_topk", "top_k") or 0
    )
    intermediate = _int(cfg, "intermediate_size", "ffn_hidden_size", "n_inner", "ffn_dim")
    expert_intermediate = _int(cfg, "moe_intermediate_size", "expert_intermediate_size")
    shared = n_shared = 0
    dense_layers = 0
    if experts:
        if (
            expert_intermediate is None
        ):  # Mixtral, gpt-oss, Llama-4: intermediate_size is per expert
            expert_intermediate = intermediate
            intermediate = _int(cfg, "intermediate_size_mlp")
        shared = _int(cfg, "shared_expert_intermediate_size") or 0
        n_shared = _int(cfg, "n_shared_experts", "num_shared_experts") or 0
        if "Llama4" in name:
            n_shared = max(n_shared, 1)  # one shared expert per MoE layer
        dense_layers = min(layers or 0, _int(cfg, "first_k_dense_replace") or 0)
        step = _int(cfg, "interleave_moe_layer_step", "decoder_sparse_step", "moe_layer_freq") or 1
        if step > 1 and layers:
            dense_layers = layers - layers // step

    sliding_window = _int(cfg, "sliding_window")
    chunk = _int(cfg, "attention_chunk_size")
    kinds = _layer_kinds(cfg, name, layers, sliding_window, chunk)
    limit, limit_key = _context_limit(cfg)
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = any(family in name for family in TIED_BY_DEFAULT)
    return Architecture(
        name=name,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        vocab=_int(cfg, "vocab_size", "padded_vocab_size", "n_vocab"),
        tied_embeddings=bool(tied),
        gated_mlp=name not in UNGATED_MLP_ARCHITECTURES,
        experts=experts,
        experts_per_token=experts_per_token,
        expert_intermediate=expert_intermediate,
        shared_expert_intermediate=shared,
        shared_experts=n_shared,
        dense_layers=dense_layers,
        kv_lora_rank=_int(cfg, "kv_lora_rank"),
        qk_rope_head_dim=_int(cfg, "qk_rope_head_dim"),
        qk_nope_head_dim=_int(cfg, "qk_nope_head_dim"),
        v_head_dim=_int(cfg, "v_head_dim"),
        q_lora_rank=_int(cfg, "q_lora_rank"),
        layer_kinds=kinds,
        sliding_window=sliding_window,
        attention_chunk_size=chunk,
        context_limit=limit,
        context_limit_key=limit_key,
        torch_dtype=_dtype_name(config, cfg),
        multimodal=multimodal,
        vision=config.get("vision_config")
        if isinstance(config.get("vision_config"), Mapping)
        else None,
        quantization=_quantization(config, cfg),
    )


def _int(cfg: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    return None


def _dtype_name(config: Mapping[str, Any], cfg: Mapping[str, Any]) -> str | None:
    for source in (config, cfg):
        for key in ("torch_dtype", "dtype"):
            value = source.get(key)
            if isinstance(value, str):
                return value
    return None


def _quantization(config: Mapping[str, Any], cfg: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for source in (config, cfg):
        value = source.get("quantization_config") or source.get("compression_config")
        if isinstance(value, Mapping):
            return value
    return None


def _layer_kinds(
    cfg: Mapping[str, Any], name: str, layers: int | None, window: int | None, chunk: int | None
) -> tuple[str, ...]:
    """Attention kind of each layer, as vLLM groups them for its KV cache."""
    if not layers:
        return ()
    declared = cfg.get("layer_types")
    if isinstance(declared, list) and len(declared) == layers:
        kinds = {"sliding_attention": SLIDING, "chunked_attention": CHUNKED}
        return tuple(kinds.get(str(kind), FULL) for kind in declared)
    if chunk:  # Llama-4: chunked local attention with RoPE, every 4th layer global (NoPE)
        no_rope = cfg.get("no_rope_layers")
        if isinstance(no_rope, list) and len(no_rope) == layers:
            return tuple(CHUNKED if flag else FULL for flag in no_rope)
        return tuple(FULL if (i + 1) % 4 == 0 else CHUNKED for i in range(layers))
    if not window or cfg.get("use_sliding_window") is False:
        return (FULL,) * layers
    pattern = _int(cfg, "sliding_window_pattern")
    lowered = name.lower()
    if pattern:  # gemma-3, cohere2: every pattern-th layer is global
        return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(layers))
    if "gemma2" in lowered or "gptoss" in lowered:  # alternate, starting with a sliding layer
        return tuple(SLIDING if i % 2 == 0 else FULL for i in range(layers))
    max_window_layers = _int(cfg, "max_window_layers")
    if max_window_layers is not None and "qwen" in lowered:
        return tuple(SLIDING if i >= max_window_layers else FULL for i in range(layers))
    return (SLIDING,) * layers  # Mistral-7B-v0.1 style: every layer slides


def _context_limit(cfg: Mapping[str, Any]) -> tuple[int | None, str | None]:
    derived = derive_context_limit(cfg)
    return derived.limit, derived.source


@dataclass(frozen=True)
class ContextLimit:
    """vLLM's derived max_model_len of a config, and where each part of it came from."""

    limit: int | None  # None: no key gives it (vLLM then assumes 2048 and warns)
    source: str | None  # e.g. "max_position_embeddings x rope_scaling factor 4 (yarn)"
    key: str | None  # the config key the base length came from
    base: int | None  # that key's value, before rope scaling
    model_max_length: int | None  # config.json's model_max_length (an allowed override)


def derive_context_limit(cfg: Mapping[str, Any]) -> ContextLimit:
    """The longest max_model_len vLLM accepts for ``cfg`` (the text config), as vLLM's
    `_get_and_verify_max_len` derives it (vllm/config/model.py; vllm/config.py before 0.10):
    the smallest of CONTEXT_KEYS, replaced by `model_max_length` when the config gives one;
    then, unless the model is Gemma-3 (already scaled) or the rope type is su, longrope or
    llama3 (already the extended length), times rope_scaling's factor (yarn: times
    original_max_position_embeddings). tokenizer_config.json's model_max_length, which vLLM
    also takes into account, is not read (it is not in config.json)."""
    found = [(value, key) for key in CONTEXT_KEYS if (value := _int(cfg, key))]
    model_max_length = _int(cfg, "model_max_length")
    if not found:
        return ContextLimit(None, None, None, None, None)
    limit, key = min(found)
    if model_max_length:
        limit, key = model_max_length, "model_max_length"
    base = limit
    source = key
    scaling = cfg.get("rope_scaling")
    model_type = str(cfg.get("model_type") or "")
    if isinstance(scaling, Mapping) and "gemma3" not in model_type:
        rope_type = str(scaling.get("rope_type") or scaling.get("type") or "default")
        factor = scaling.get("factor", 1.0)
        if rope_type not in ROPE_TYPES_ALREADY_EXTENDED and _finite(factor):
            if rope_type == "yarn":
                limit = _int(scaling, "original_max_position_embeddings") or limit
            limit = int(limit * float(factor))
            if float(factor) != 1.0 or rope_type == "yarn":
                source = f"{key} x rope_scaling factor {float(factor):g} ({rope_type})"
                if rope_type == "yarn" and _int(scaling, "original_max_position_embeddings"):
                    source = (f"rope_scaling original_max_position_embeddings x factor "
                              f"{float(factor):g} (yarn)")
    return ContextLimit(limit, source, key, base, model_max_length)


def _shown(value: Any) -> str:
    text = f"{value:,}" if isinstance(value, int) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)
