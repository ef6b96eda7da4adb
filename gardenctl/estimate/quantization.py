"""How many bytes a parameter takes once vLLM has loaded it, by quantization scheme (pure).

`weight_format(quantization_config, requested, dtype_bytes)` says what the linear layers of the
decoder (attention projections, MLPs, experts) take per parameter, scales and zero points
included, and whether only the MoE experts are quantized (mxfp4). Embeddings, the LM head,
norms, routers and vision towers stay in the 16-bit model dtype: that is what AWQ, GPTQ,
compressed-tensors and fp8 checkpoints do in practice (their `ignore` lists name `lm_head`).

Layouts checked against vLLM 0.11-0.19 (`quantization/{awq,gptq,fp8,mxfp4}.py`, compressed-tensors
schemes) and the measured `Model loading took` of calibration rows 4-6, 58, 61, 62, 68 and 81.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MXFP4_BLOCK = 32  # one 8-bit (e8m0) scale per 32 fp4 values
# vLLM's Marlin MXFP4 MoE kernel pads each expert's intermediate size to a multiple of 128 and the
# hidden size to 256 (mxfp4.py, create_weights); the other backends pad less (Triton: 64). We use
# the largest padding so that the estimate holds whichever backend vLLM picks.
MXFP4_INTERMEDIATE_ALIGN = 128
MXFP4_HIDDEN_ALIGN = 256

# Schemes a user may pass as --quantization on an unquantized checkpoint (vLLM quantizes online).
ONLINE_SCHEMES = {"fp8": 1.0, "ptpc_fp8": 1.0, "fbgemm_fp8": 1.0, "bitsandbytes": 0.5625}


@dataclass(frozen=True)
class WeightFormat:
    """Bytes per parameter of the quantized parts; `dtype_bytes` for everything else."""

    scheme: str  # "none", "awq", "gptq", "fp8", "compressed-tensors", "mxfp4", ...
    linear_bytes: float  # decoder linear layers (attention, MLP, experts)
    expert_bytes: float  # routed MoE experts
    dtype_bytes: int  # embeddings, LM head, norms, routers, vision tower
    description: str
    pad_mxfp4_experts: bool = False

    @property
    def quantized(self) -> bool:
        return self.scheme != "none"


def weight_format(
    quantization_config: Mapping[str, Any] | None, requested: str | None, dtype_bytes: int
) -> WeightFormat:
    """The format of a checkpoint: its config's quantization_config wins over ``requested``."""
    if quantization_config:
        return _from_config(quantization_config, dtype_bytes)
    scheme = (requested or "").lower()
    if scheme in ONLINE_SCHEMES:
        per_param = ONLINE_SCHEMES[scheme]
        return WeightFormat(
            scheme, per_param, per_param, dtype_bytes, f"{scheme} (quantized by vLLM at load)"
        )
    for name, fmt in _NAMED_SCHEMES.items():
        if scheme.startswith(name):
            return _from_config(fmt, dtype_bytes)
    return WeightFormat("none", dtype_bytes, dtype_bytes, dtype_bytes, f"{dtype_bytes} B/param")


_NAMED_SCHEMES: dict[str, Mapping[str, Any]] = {
    # --quantization given without a quantization_config: assume the scheme's usual layout.
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "mxfp4": {"quant_method": "mxfp4"},
    "compressed-tensors": {"quant_method": "compressed-tensors"},
}


def _from_config(qc: Mapping[str, Any], dtype_bytes: int) -> WeightFormat:
    method = str(qc.get("quant_method") or qc.get("quant_type") or qc.get("format") or "").lower()
    if method == "mxfp4":
        per_param = 0.5 + 1 / MXFP4_BLOCK
        return WeightFormat(
            "mxfp4",
            dtype_bytes,
            per_param,
            dtype_bytes,
            f"mxfp4 MoE experts ({per_param:.4g} B/param incl. e8m0 scales, padded as vLLM's "
            f"Marlin kernel does), other weights {dtype_bytes} B/param",
            pad_mxfp4_experts=True,
        )
    if method in ("awq", "gptq", "awq_marlin", "gptq_marlin", "marlin"):
        bits = int(qc.get("bits") or qc.get("w_bit") or 4)
        group = int(qc.get("group_size") or qc.get("q_group_size") or 128)
        per_param = _grouped(bits, group, zero_points=method.startswith("awq") or method == "gptq")
        return WeightFormat(
            method.split("_")[0],
            per_param,
            per_param,
            dtype_bytes,
            f"{method} int{bits} g{group} ({per_param:.4g} B/param incl. scales and zeros)",
        )
    if method in ("fp8", "fbgemm_fp8", "ptpc_fp8", "modelopt"):
        return WeightFormat(method, 1.0, 1.0, dtype_bytes, f"{method} (1 B/param + scales)")
    if method == "bitsandbytes":
        per_param = 0.5625 if qc.get("load_in_4bit", True) else 1.0
        return WeightFormat(
            method, per_param, per_param, dtype_bytes, f"bitsandbytes ({per_param} B/param)"
        )
    if method in ("compressed-tensors", "compressed_tensors"):
        return _compressed_tensors(qc, dtype_bytes)
    # Unknown scheme: count it at 8 bits, which over-estimates any 4-bit scheme (safe side).
    return WeightFormat(
        method or "unknown", 1.0, 1.0, dtype_bytes, f"unknown scheme {method!r}: 1 B/param"
    )


def _compressed_tensors(qc: Mapping[str, Any], dtype_bytes: int) -> WeightFormat:
    groups = qc.get("config_groups") or {}
    weights: Mapping[str, Any] = {}
    for group in groups.values() if isinstance(groups, Mapping) else []:
        if isinstance(group, Mapping) and isinstance(group.get("weights"), Mapping):
            weights = group["weights"]
            break
    bits = int(weights.get("num_bits") or 8)
    kind = str(weights.get("type") or "int")
    strategy = str(weights.get("strategy") or "channel")
    if strategy == "group":
        group_size = int(weights.get("group_size") or 128)
        per_param = _grouped(bits, group_size, zero_points=weights.get("symmetric") is False)
        detail = f"g{group_size}"
    else:  # channel / tensor / block scales are one number per row or per block: negligible
        per_param = bits / 8
        detail = strategy
    label = f"w{bits}{'a16' if bits == 4 else ''} {kind}" if kind else f"w{bits}"
    return WeightFormat(
        "compressed-tensors",
        per_param,
        per_param,
        dtype_bytes,
        f"compressed-tensors {label} {detail} ({per_param:.4g} B/param incl. scales)",
    )


def _grouped(bits: int, group_size: int, *, zero_points: bool) -> float:
    """Packed ints plus one 16-bit scale (and a packed zero point) per group of inputs."""
    if group_size <= 0:  # per-channel
        return bits / 8
    return bits / 8 + (2 + (bits / 8 if zero_points else 0)) / group_size


def pad_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
