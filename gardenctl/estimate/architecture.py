"""The numbers of a model's architecture, read from its config.json (a pure function of a dict).

`read_architecture(config)` turns a Hugging Face config.json (or the built-in catalog's copy of
one) into an `Architecture`: layers, heads, head dim, MLP and MoE sizes, MLA ranks, which layers
use sliding-window or chunked attention, the context limit. Multimodal configs keep the language
model's numbers under `text_config` (or `llm_config` / `language_config`); those win over the
top-level keys. A number the config does not give is None: callers say so in their sources.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# rope_scaling types whose max_position_embeddings already is the extended length.
ROPE_TYPES_ALREADY_EXTENDED = ("su", "longrope", "llama3", "default", "mrope")

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
    """Read the numbers of ``config`` (a parsed config.json); never raises on missing keys."""
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
    found = [(value, key) for key in CONTEXT_KEYS if (value := _int(cfg, key))]
    if not found:
        return None, None
    limit, key = min(found)
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, Mapping):
        rope_type = str(scaling.get("rope_type") or scaling.get("type") or "default")
        factor = scaling.get("factor")
        if rope_type not in ROPE_TYPES_ALREADY_EXTENDED and isinstance(factor, (int, float)):
            original = _int(scaling, "original_max_position_embeddings") or limit
            base = original if rope_type == "yarn" else limit
            return int(base * factor), f"{key} x rope_scaling factor {factor:g} ({rope_type})"
    return limit, key
