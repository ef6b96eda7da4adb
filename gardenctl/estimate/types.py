"""Values that flow into and out of the memory estimator (no logic, no I/O).

Data flow: `read_model_metadata` (I/O: config.json, safetensors headers, HF cache) gives a
`ModelMetadata`; `estimate_memory(request, metadata)` (pure) gives a `MemoryEstimate`, itemised
per GPU, each item with the source of its number.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ESTIMATE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class EstimateRequest:
    """What a worker will be asked to serve; mirrors the model fields that change memory."""

    model: str  # Hugging Face id or local path
    revision: str | None = None
    max_model_len: int | None = None  # None: the model's own limit from config.json
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    min_concurrency: int = 1
    enforce_eager: bool = False
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    vllm_version: str | None = None  # the release that will run; None: assume the newest modelled


@dataclass(frozen=True)
class ModelMetadata:
    """What could be read about a model without loading it. Every field may be missing."""

    ref: str  # as the user wrote it
    config: Mapping[str, Any] | None = None  # parsed config.json
    config_source: str | None = None  # e.g. "config.json in ~/.cache/huggingface/..."
    safetensors_bytes: int | None = None  # sum of tensor data sizes from the headers
    safetensors_params: int | None = None  # number of elements over all tensors
    safetensors_dtypes: Mapping[str, int] = field(default_factory=dict)  # dtype -> bytes
    safetensors_source: str | None = None
    notes: tuple[str, ...] = ()  # why something could not be read
    weight_files_bytes: int | None = None  # on-disk size of *.safetensors + *.bin (model-garden)
    published_params: int | None = None  # the model's published parameter count (catalog)
    published_params_source: str | None = None


@dataclass(frozen=True)
class Item:
    """One line of the estimate: bytes per GPU and where the number came from."""

    bytes: int
    source: str


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory one worker needs on each of its GPUs to start and hold its sequences.

    `budget_bytes` is what `--gpu-memory-utilization` x total must cover; `outside_budget_bytes`
    is what the worker adds on top of it: the CUDA context always, and the CUDA-graph pool for
    releases that allocate it after sizing the KV cache (before vLLM 0.18; from 0.18 gardenctl's
    VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1 puts it inside). `total_bytes` is the whole
    footprint on each GPU. `vllm_version` is the release the estimate assumed and `vllm_range`
    the modelled release range it used (gardenctl.estimate.releases).
    """

    estimator: str  # "gardenctl" | "model-garden" | "ndif"
    model: str
    tensor_parallel_size: int
    max_model_len: int
    max_model_len_source: str
    min_concurrency: int
    kv_bytes_per_token: int  # per GPU
    kv_bytes_per_token_source: str
    weights: Item
    kv_cache: Item
    activation: Item
    cuda_graph: Item
    non_torch: Item
    cuda_context: Item
    warnings: tuple[str, ...] = ()
    # "estimate" (the static model) or "measured" (sized from a learned profile, see
    # gardenctl.profiles.sizing); the note says where and when it was measured.
    memory_source: str = "estimate"
    memory_note: str = ""
    vllm_version: str = "0.32.0"
    # True: no release was declared or detected and `vllm_version` is only what was assumed
    # (then no measured profile is taken as the truth: it may be of another release)
    vllm_version_assumed: bool = False
    vllm_range: str = "0.28-0.32"
    graphs_in_budget: bool = True
    # What a measured graph capture took beyond the estimate vLLM's budget held (a learned
    # profile says; 0 for the static estimate): allocated after the KV cache was sized, it
    # sits outside the budget. PyTorch memory, unlike the CUDA context.
    graph_overflow_bytes: int = 0

    @property
    def budget_bytes(self) -> int:
        graphs = self.cuda_graph.bytes if self.graphs_in_budget else 0
        return (
            self.weights.bytes
            + self.kv_cache.bytes
            + self.activation.bytes
            + graphs
            + self.non_torch.bytes
        )

    @property
    def outside_budget_bytes(self) -> int:
        """Bytes on each GPU beyond ceil(total x F): the CUDA context, and the graph pool when
        the release allocates it outside the budget."""
        graphs = 0 if self.graphs_in_budget else self.cuda_graph.bytes
        return self.cuda_context.bytes + graphs + self.graph_overflow_bytes

    @property
    def overhead_bytes(self) -> int:
        return self.non_torch.bytes + self.cuda_context.bytes

    @property
    def total_bytes(self) -> int:
        return self.budget_bytes + self.outside_budget_bytes
