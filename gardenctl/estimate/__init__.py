"""The memory estimator: how much GPU memory a vLLM worker needs, item by item, with sources.

    metadata = read_model_metadata("Qwen/Qwen2.5-7B-Instruct")          # the only I/O
    estimate = estimate_memory(EstimateRequest(model=..., max_model_len=8192), metadata)

`read_model_metadata` reads config.json and safetensors headers (a local folder, the offline
Hugging Face cache, or the built-in catalog); `estimate_memory` is pure. `estimator` selects
gardenctl's own model or one of the seeds' baselines ("model-garden", "ndif").
Importing this package stays cheap: huggingface_hub is imported only when the cache is read.
"""

from gardenctl.estimate.core import ESTIMATORS, estimate_memory
from gardenctl.estimate.metadata import read_model_metadata
from gardenctl.estimate.types import (
    ESTIMATE_FORMAT_VERSION,
    EstimateRequest,
    Item,
    MemoryEstimate,
    ModelMetadata,
)

__all__ = [
    "ESTIMATE_FORMAT_VERSION",
    "ESTIMATORS",
    "EstimateRequest",
    "Item",
    "MemoryEstimate",
    "ModelMetadata",
    "estimate_memory",
    "read_model_metadata",
]
