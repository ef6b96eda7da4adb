"""Activation peak, CUDA-graph pool, non-torch memory and CUDA context per GPU (pure).

Each constant says which calibration rows (tests/data/vllm-startup-memory-calibration.csv) and
which vLLM version it was fitted on; benchmarks/estimator_accuracy.py shows the fit row by row.
The rows are H100 start-ups of vLLM 0.19 (V1 engine) unless a comment says otherwise.

Activation peak. vLLM's profile run pushes `max_num_batched_tokens` (T) tokens through the model
and then samples `min(max_num_seqs, T)` (S) sequences; the torch peak above the weights is
- the larger of the forward pass's live tensors, T x (3 hidden + gate/up/act width) x 2 B, and
  the sampler's, S x vocab x ~15 B (fp32 logits, probabilities, log-probabilities and sort
  buffers) plus the hidden states kept for it (T x hidden x 2 B);
- plus, for MoE models, the fused-MoE workspace vLLM keeps allocated between layers,
  T x top-k x (max(I, hidden) + max(2 I, hidden)) x 2 B (I = expert width per rank);
- plus, for multimodal models, the encoder-output cache held during the text profile run,
  T x hidden x 2 B;
- plus a small base (attention metadata, rotary caches, allocator slack).
So it grows with T, the vocabulary and the MoE top-k, not with max_model_len.

Per vLLM release (gardenctl.estimate.releases.ReleaseTraits): the profile run has the same
shape in V0 and V1 (T tokens over S sequences, then S x vocab fp32 logits through the sampler),
but the defaults of T and S differ (core.py picks them from the traits); the graph pool scales
with the number of graphs captured per layer (capture sizes relative to 0.19's 51); NCCL's
buffers are non-torch memory inside the budget up to 0.10 and part of the context outside it
from 0.11.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gardenctl.estimate.architecture import Architecture
from gardenctl.estimate.releases import ReleaseTraits
from gardenctl.units import GiB, MiB

# --- defaults for what the request leaves unset -------------------------------------------
# vLLM's serve default on >= 70 GiB GPUs (H100/H200); A100/L40/consumer cards default to 2048
# tokens and 256 sequences, so assuming the H100 values over-estimates there (safe side).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_MAX_NUM_SEQS = 1024
# vLLM's VLLM_FUSED_MOE_CHUNK_SIZE: the fused-MoE workspace never covers more tokens than this.
MOE_CHUNK_TOKENS = 32768

# --- activation (rows 2-62 of vLLM 0.19: every estimate within 0 to +0.14 GiB of the log) --
# Bytes per sampled logit: 3.69 x fp32 (rows 33, 34, 62, 9: phi-2, phi-4, Qwen2.5-7B, gemma-2-9b
# lie on one line in vocab x 1024 sequences, residual < 0.05 GiB).
SAMPLER_BYTES_PER_LOGIT = 15
# Base of every profile run; rows 2 and 16 (CodeLlama-7b, granite-8b, forward-bound).
ACTIVATION_BASE = 80 * MiB

# --- CUDA graphs (FULL_AND_PIECEWISE capture, vLLM 0.19; rows 2-17, 33-62) ----------------
# The pool grows with the number of layers (one piecewise graph per layer and capture size).
# Least squares over the 16 dense rows gives 0.37 GiB + 15.8 MiB/layer (residuals up to
# +0.19 GiB); the slope is raised so that no dense row exceeds the estimate by > 0.04 GiB.
CUDA_GRAPH_BASE = int(0.36 * GiB)
CUDA_GRAPH_PER_LAYER = int(0.0175 * GiB)
# MoE layers capture extra routing buffers (rows 3 and 55: +0.26 GiB over a dense model).
CUDA_GRAPH_MOE_EXTRA = int(0.30 * GiB)
# MLA decode graphs (FlashMLA / cutlass MLA workspaces): row 3 DeepSeek-V2-Lite, +0.5 GiB more.
CUDA_GRAPH_MLA_EXTRA = int(0.50 * GiB)

# --- memory outside torch's allocator ------------------------------------------------------
# Non-torch (cuBLAS workspaces, NCCL buffers, custom all-reduce): rows 2-62 at TP 1 measure
# 0.24-0.27 GiB (granite-3.3-8b: 0.46); rows 4, 37 (TP 2) 2.09-2.10 GiB, rows 5, 39 (TP 4) 2.21.
NON_TORCH_TP1 = int(0.27 * GiB)
NON_TORCH_MULTI_GPU = int(2.25 * GiB)
# CUDA context, outside --gpu-memory-utilization: total minus free memory at start-up
# (init_free_gib) is 0.51 GiB at TP 1 (rows 2-62) and 1.53-1.55 GiB at TP 2/4 (rows 4, 5, 37, 39).
CUDA_CONTEXT_TP1 = int(0.52 * GiB)
CUDA_CONTEXT_MULTI_GPU = int(1.56 * GiB)


@dataclass(frozen=True)
class Overhead:
    bytes: int
    source: str


def estimate_activation(
    arch: Architecture,
    tp: int,
    act_bytes: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    assumed: str,
    traits: ReleaseTraits,
) -> Overhead:
    """Peak torch memory of vLLM's profile run beyond the weights, on one GPU."""
    tokens = max_num_batched_tokens
    seqs = min(max_num_seqs, tokens)
    hidden = arch.hidden or 0
    width = math.ceil((arch.intermediate or 0) / tp) * (3 if arch.gated_mlp else 2)
    forward = tokens * (3 * hidden + width) * act_bytes
    sampler = seqs * (arch.vocab or 0) * SAMPLER_BYTES_PER_LOGIT + tokens * hidden * act_bytes
    parts = [f"{tokens:,} batched tokens{assumed}"]
    if sampler >= forward:
        parts.append(f"sampler {seqs:,} seqs x vocab {arch.vocab:,} {_gib(sampler)}")
    else:
        parts.append(f"forward {_gib(forward)}")
    moe = 0
    if arch.is_moe and arch.expert_intermediate:
        per_rank = math.ceil(arch.expert_intermediate / tp)
        moe_tokens = min(tokens, MOE_CHUNK_TOKENS)
        columns = max(per_rank, hidden) + max(2 * per_rank, hidden)
        moe = moe_tokens * max(1, arch.experts_per_token) * columns * act_bytes
        parts.append(f"MoE workspace top-{arch.experts_per_token} {_gib(moe)}")
    encoder = tokens * hidden * act_bytes if arch.multimodal else 0
    if encoder:
        parts.append(f"encoder cache {_gib(encoder)}")
    total = ACTIVATION_BASE + max(forward, sampler) + moe + encoder
    return Overhead(
        total,
        "profile-run model: " + ", ".join(parts)
        + f" ({traits.engine} profile run of vLLM {traits.label}; constants: vLLM 0.19 H100 fit)",
    )


def estimate_cuda_graphs(
    arch: Architecture, enforce_eager: bool, traits: ReleaseTraits
) -> Overhead:
    if enforce_eager:
        return Overhead(0, "enforce_eager: no CUDA graphs are captured")
    layers = arch.layers or 0
    per_layer = round(CUDA_GRAPH_PER_LAYER * traits.graph_factor)
    total = CUDA_GRAPH_BASE + per_layer * layers
    parts = [f"{_gib(CUDA_GRAPH_BASE)} + {layers} layers x {per_layer / MiB:.1f} MiB"]
    if arch.is_moe:
        total += CUDA_GRAPH_MOE_EXTRA
        parts.append(f"MoE {_gib(CUDA_GRAPH_MOE_EXTRA)}")
    if arch.is_mla:
        total += CUDA_GRAPH_MLA_EXTRA
        parts.append(f"MLA {_gib(CUDA_GRAPH_MLA_EXTRA)}")
    where = "inside" if traits.graphs_in_budget else "OUTSIDE"
    return Overhead(
        total,
        "graph pool: " + " + ".join(parts) + f" ({traits.graph_mode.replace('_', ' ')}, "
        f"{traits.capture_sizes} sizes, vLLM {traits.label}; 0.19 H100 fit; {where} the budget)",
    )


def estimate_non_torch(tp: int, traits: ReleaseTraits) -> Overhead:
    if tp > 1 and not traits.nccl_outside_budget:
        nccl = CUDA_CONTEXT_MULTI_GPU - CUDA_CONTEXT_TP1
        return Overhead(
            NON_TORCH_MULTI_GPU + nccl,
            f"measured at TP>=2 (NCCL, custom all-reduce; vLLM 0.19) + NCCL init "
            f"{_gib(nccl)}, inside the budget up to vLLM 0.10 (snapshot before NCCL)",
        )
    if tp > 1:
        return Overhead(
            NON_TORCH_MULTI_GPU, "measured at TP>=2 (NCCL, custom all-reduce; vLLM 0.19)"
        )
    return Overhead(NON_TORCH_TP1, "measured at TP 1 (cuBLAS workspaces; vLLM 0.19)")


def estimate_cuda_context(tp: int, traits: ReleaseTraits) -> Overhead:
    if tp > 1 and traits.nccl_outside_budget:
        return Overhead(
            CUDA_CONTEXT_MULTI_GPU,
            "CUDA context + NCCL at TP>=2, outside the budget (measured on H100)",
        )
    if tp > 1:
        return Overhead(
            CUDA_CONTEXT_TP1,
            f"CUDA context, outside the budget (measured on H100); NCCL is inside it in "
            f"vLLM {traits.label}",
        )
    return Overhead(CUDA_CONTEXT_TP1, "CUDA context at TP 1, outside the budget (measured on H100)")


def _gib(n_bytes: int | float) -> str:
    return f"{n_bytes / GiB:.2f} GiB"
