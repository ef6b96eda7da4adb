"""The seeds' estimators, kept as named baselines to measure ours against (pure).

- model-garden (leokeba/model-garden, model_garden/inference.py, calculate_gpu_memory_utilization):
  size in "GB" = weight files on disk / 1024**3, else 2 x the parameter count in the name (at
  least 1.0), else 7.0; KV = size / 7.0 x max_model_len / 1000 x 0.4 (not divided by TP;
  max_model_len defaults to 4096); need = (size / TP + KV) x 1.2. Its "GB" are GiB: it divides
  bytes by 1024**3 and compares with torch's total / 1024**3. Paired with the `tiered` policy
  (gardenctl.placement.utilization.tiered_utilization) it reproduces its utilizations.
- ndif (ndif-team's Ray scheduler): required = model size x 3.0 + 512 MiB, no tensor parallelism
  (a model takes whole GPUs or a fraction of one), so the size is not divided.

Both are represented as a `MemoryEstimate` whose `total_bytes` equals the seed's own figure and
whose CUDA context is 0 (the seeds leave it out).
"""

from __future__ import annotations

import re

from gardenctl.estimate.types import EstimateRequest, Item, MemoryEstimate, ModelMetadata
from gardenctl.units import GiB, MiB

MODEL_GARDEN_NAME = re.compile(r"[-_](\d+(?:\.\d+)?)[Bb](?!it)")
MODEL_GARDEN_DEFAULT_GB = 7.0
MODEL_GARDEN_DEFAULT_LEN = 4096
MODEL_GARDEN_MARGIN = 1.2
NDIF_COEFFICIENT = 3.0
NDIF_BUFFER = 512 * MiB


def model_garden_size_gb(model: str, metadata: ModelMetadata) -> tuple[float, str]:
    """model-garden's model size in its "GB" (GiB), and where it came from."""
    if metadata.weight_files_bytes:
        return metadata.weight_files_bytes / GiB, "model-garden: weight files on disk / 1024**3"
    match = MODEL_GARDEN_NAME.search(model)
    if match:
        size = max(1.0, float(match.group(1)) * 2)
        return size, f'model-garden: name "{match.group(0)}" x 2 GB per billion params'
    return MODEL_GARDEN_DEFAULT_GB, "model-garden: DEFAULT 7.0 GB (no files, no size in the name)"


def model_garden_estimate(request: EstimateRequest, metadata: ModelMetadata) -> MemoryEstimate:
    tp = request.tensor_parallel_size
    size, size_source = model_garden_size_gb(request.model, metadata)
    max_model_len = request.max_model_len or MODEL_GARDEN_DEFAULT_LEN
    kv_gb = (size / 7.0) * (max_model_len / 1000) * 0.4
    weights_gb = size / tp
    total = round((weights_gb + kv_gb) * MODEL_GARDEN_MARGIN * GiB)
    weights = round(weights_gb * GiB)
    kv = round(kv_gb * GiB)
    warnings: tuple[str, ...] = ()
    if size_source.startswith("model-garden: DEFAULT"):
        warnings = (f"model-garden baseline: size of {request.model} is its DEFAULT 7.0 GB",)
    return MemoryEstimate(
        estimator="model-garden",
        model=request.model,
        tensor_parallel_size=tp,
        max_model_len=max_model_len,
        max_model_len_source=(
            "requested"
            if request.max_model_len
            else f"model-garden default {MODEL_GARDEN_DEFAULT_LEN}"
        ),
        min_concurrency=request.min_concurrency,
        kv_bytes_per_token=round(kv_gb * GiB / max_model_len),
        kv_bytes_per_token_source="model-garden: size / 7.0 x 0.4 GB per 1000 tokens",
        weights=Item(weights, size_source + (f" / TP {tp}" if tp > 1 else "")),
        kv_cache=Item(kv, "model-garden: (size / 7.0) x (max_model_len / 1000) x 0.4 GB, not / TP"),
        activation=Item(0, "model-garden: inside its x1.2 margin"),
        cuda_graph=Item(0, "model-garden: inside its x1.2 margin"),
        non_torch=Item(total - weights - kv, "model-garden x1.2 margin (buffers, CUDA graphs)"),
        cuda_context=Item(0, "model-garden: not counted"),
        warnings=warnings,
    )


def ndif_estimate(
    request: EstimateRequest, weights_bytes: int, weights_source: str
) -> MemoryEstimate:
    """ndif's requirement for a model of ``weights_bytes`` (the same weights figure as ours)."""
    return MemoryEstimate(
        estimator="ndif",
        model=request.model,
        tensor_parallel_size=request.tensor_parallel_size,
        max_model_len=request.max_model_len or 0,
        max_model_len_source="not used by ndif" if not request.max_model_len else "requested",
        min_concurrency=request.min_concurrency,
        kv_bytes_per_token=0,
        kv_bytes_per_token_source="ndif: no KV term (inside its x3.0 coefficient)",
        weights=Item(weights_bytes, f"ndif: model size, not divided by TP ({weights_source})"),
        kv_cache=Item(0, "ndif: inside its x3.0 coefficient"),
        activation=Item(
            round(weights_bytes * (NDIF_COEFFICIENT - 1.0)),
            f"ndif x{NDIF_COEFFICIENT:.1f} coefficient "
            f"(model size x {NDIF_COEFFICIENT - 1:.1f} on top of the weights)",
        ),
        cuda_graph=Item(0, "ndif: inside its x3.0 coefficient"),
        non_torch=Item(NDIF_BUFFER, "ndif buffer 512 MiB"),
        cuda_context=Item(0, "ndif: not counted"),
    )
