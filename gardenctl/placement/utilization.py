"""From a memory estimate to `--gpu-memory-utilization` and the bytes a worker claims on a GPU.

vLLM facts (checked against vLLM 0.32, see docs/vllm.md): F is a fraction of the GPU's
*total* memory, per rank; its budget ceil(total x F) covers weights, activation peak, non-torch
memory, the KV cache and (since v0.21) the CUDA-graph pool, but not the CUDA context, which
each worker adds on top. So a worker claims ceil(F x total) + context on every GPU it uses.

Policies (pure functions of the estimate and the GPU):
- fit:    F = the estimate's budget plus a safety margin, rounded up to 0.001;
- tiered: model-garden's bands (0.50-0.75 when the need is under 70% of the GPU, 0.88 up to
          100%, 0.95 beyond), meant for a model alone on its GPU;
- fill:   starts from fit; the planner then shares each GPU's spare memory among its new
          workers (see placement.solver).
"""

from __future__ import annotations

import math

from gardenctl.estimate.types import MemoryEstimate
from gardenctl.units import ceil_to

UTILIZATION_STEP = 0.001  # F is passed with three decimals (80 GiB x 0.001 = 82 MiB)
MIN_UTILIZATION = 0.01


def fit_utilization(estimate: MemoryEstimate, gpu_total_bytes: int, safety_margin: float) -> float:
    """Smallest F (to 0.001) whose budget holds the estimate plus ``safety_margin``.

    May exceed 1.0: the caller decides that the worker does not fit.
    """
    need = estimate.budget_bytes * (1.0 + safety_margin)
    return max(MIN_UTILIZATION, ceil_to(need / gpu_total_bytes, UTILIZATION_STEP))


def tiered_utilization(estimate: MemoryEstimate, gpu_total_bytes: int) -> float:
    """model-garden's bands, applied to the estimate's total footprint (its own includes x1.2)."""
    need = estimate.total_bytes
    if need >= gpu_total_bytes:
        utilization = 0.95
    elif need >= gpu_total_bytes * 0.7:
        utilization = 0.88
    else:
        utilization = max(0.50, min(0.75, need / gpu_total_bytes + 0.20))
    return round(utilization, 2)


def claim_bytes(utilization: float, gpu_total_bytes: int, context_bytes: int) -> int:
    """Bytes a worker takes on one GPU: its vLLM budget plus the CUDA context outside it."""
    return math.ceil(utilization * gpu_total_bytes) + context_bytes
