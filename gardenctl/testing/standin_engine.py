"""The simulated engine start-up: GPU memory accounting and the log lines and errors of vLLM.

Pure functions: ``simulate_startup`` turns the engine settings and an optional injected
failure into the lines vLLM would log and, if start-up fails, the error it would print.

Memory follows vLLM >= 0.21 on one simulated GPU per rank (see docs/vllm.md):
budget = ceil(total x gpu_memory_utilization); KV cache = budget - weights/TP - activation
peak - non-torch memory - CUDA-graph pool (none with --enforce-eager), or exactly
--kv-cache-memory-bytes when given. The constants are those vLLM reported for
CodeLlama-7b on an H100 (tests/data/vllm-startup-memory-calibration.csv, row 2) and the TP>=2
figures of docs/vllm.md. Like vLLM, start-up fails on its own when the numbers say so:
free memory below the budget, no memory left for the KV cache, or less KV cache than one
max_model_len sequence needs. Free memory at start-up is the total minus the CUDA context:
the simulated GPU has no other tenants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GiB = 1024**3

BLOCK_SIZE = 16  # tokens per KV-cache block (vLLM's default)
DEFAULT_MAX_MODEL_LEN = 8192  # stands for the model's max_position_embeddings
CUDA_CONTEXT_BYTES = {1: int(0.51 * GiB), 2: int(1.53 * GiB)}  # by TP=1 / TP>=2
NON_TORCH_BYTES = {1: int(0.25 * GiB), 2: int(2.1 * GiB)}
ACTIVATION_PEAK_BYTES = int(0.77 * GiB)
CUDA_GRAPH_POOL_BYTES = int(0.84 * GiB)

FAILURE_MODES = (
    "oom", "kv_cache", "no_cache_blocks", "model_not_found", "free_memory",
    "crash_after_ready", "hang",
)
STARTUP_FAILURE_MODES = ("oom", "kv_cache", "no_cache_blocks", "model_not_found", "free_memory")

_VLLM = "/usr/local/lib/python3.12/dist-packages/vllm"  # where frames claim to come from


@dataclass(frozen=True)
class EngineSettings:
    model: str
    revision: str | None
    gpu_total_bytes: int
    weights_bytes: int  # all ranks together
    kv_bytes_per_token: int  # at TP=1 in the model's dtype
    tensor_parallel_size: int
    gpu_memory_utilization: float
    kv_cache_memory_bytes: int | None
    kv_cache_dtype: str
    max_model_len: int
    enforce_eager: bool
    load_seconds: float  # how long "loading" takes, for the log line


@dataclass(frozen=True)
class MemoryProfile:
    """What one rank's GPU holds, in bytes, as vLLM's profiler would report it."""

    total: int
    free_at_start: int
    requested: int
    weights: int
    activation_peak: int
    non_torch: int
    cuda_graphs: int
    kv_cache: int  # may be negative: nothing left for the cache
    kv_bytes_per_token: int
    kv_tokens: int
    max_model_len: int

    @property
    def max_concurrency(self) -> float:
        return self.kv_tokens / self.max_model_len


@dataclass(frozen=True)
class LogLine:
    process: str  # "api" (API server) or "engine" (EngineCore)
    level: str
    source: str
    message: str


@dataclass(frozen=True)
class EngineFailure:
    """How a failed start-up or a crash shows in the log, and the reason in one word."""

    reason: str
    engine_traceback: tuple[str, ...]  # logged by EngineCore at ERROR level, one line each
    server_traceback: tuple[str, ...]  # written raw to stderr by the API server


@dataclass(frozen=True)
class StartupResult:
    lines: tuple[LogLine, ...]
    failure: EngineFailure | None


def profile_memory(settings: EngineSettings) -> MemoryProfile:
    tp = settings.tensor_parallel_size
    tp_key = 1 if tp == 1 else 2
    total = settings.gpu_total_bytes
    requested = math.ceil(total * settings.gpu_memory_utilization)
    weights = math.ceil(settings.weights_bytes / tp)
    cuda_graphs = 0 if settings.enforce_eager else CUDA_GRAPH_POOL_BYTES
    per_token = math.ceil(settings.kv_bytes_per_token / tp)
    if settings.kv_cache_dtype.startswith("fp8"):
        per_token = math.ceil(per_token / 2)
    if settings.kv_cache_memory_bytes is not None:
        kv_cache = settings.kv_cache_memory_bytes
    else:
        kv_cache = (requested - weights - ACTIVATION_PEAK_BYTES - NON_TORCH_BYTES[tp_key]
                    - cuda_graphs)
    kv_tokens = max(0, kv_cache) // per_token // BLOCK_SIZE * BLOCK_SIZE
    return MemoryProfile(
        total=total,
        free_at_start=total - CUDA_CONTEXT_BYTES[tp_key],
        requested=requested,
        weights=weights,
        activation_peak=ACTIVATION_PEAK_BYTES,
        non_torch=NON_TORCH_BYTES[tp_key],
        cuda_graphs=cuda_graphs,
        kv_cache=kv_cache,
        kv_bytes_per_token=per_token,
        kv_tokens=kv_tokens,
        max_model_len=settings.max_model_len,
    )


def simulate_startup(settings: EngineSettings, fail: str | None) -> StartupResult:
    """The lines logged while the engine starts, and the failure that ends it, if any."""
    profile = profile_memory(settings)
    if fail == "model_not_found":
        return StartupResult((), model_not_found(settings.model, settings.revision))
    if fail == "free_memory":
        return StartupResult((), free_memory_too_low(profile, settings, profile.requested // 2))
    if profile.free_at_start < profile.requested:
        return StartupResult((), free_memory_too_low(profile, settings, profile.free_at_start))
    lines = [LogLine("engine", "INFO", "gpu_model_runner.py",
                     f"Starting to load model {settings.model}...")]
    if fail == "oom":
        return StartupResult(tuple(lines), cuda_out_of_memory(profile))
    lines.append(LogLine("engine", "INFO", "gpu_model_runner.py",
                         f"Model loading took {_gib(profile.weights):.4f} GiB memory "
                         f"and {settings.load_seconds:.6f} seconds"))
    kv_cache = profile.kv_cache
    if fail == "no_cache_blocks":
        kv_cache = min(kv_cache, 0)
    elif fail == "kv_cache":
        kv_cache = min(kv_cache, profile.max_model_len * profile.kv_bytes_per_token // 2)
    lines.append(LogLine("engine", "INFO", "gpu_worker.py",
                         f"Available KV cache memory: {_gib(kv_cache):.2f} GiB"))
    if kv_cache <= 0:
        return StartupResult(tuple(lines), no_cache_blocks())
    needed = profile.max_model_len * profile.kv_bytes_per_token
    if needed > kv_cache:
        return StartupResult(tuple(lines), kv_cache_too_small(profile, kv_cache))
    lines.append(LogLine("engine", "INFO", "kv_cache_utils.py",
                         f"GPU KV cache size: {profile.kv_tokens:,} tokens"))
    lines.append(LogLine("engine", "INFO", "kv_cache_utils.py",
                         f"Maximum concurrency for {profile.max_model_len:,} tokens per request: "
                         f"{profile.max_concurrency:.2f}x"))
    return StartupResult(tuple(lines), None)


def _gib(n_bytes: int) -> float:
    return n_bytes / GiB


def _engine_core_failed(
    reason: str, frames: tuple[str, ...], error: tuple[str, ...]
) -> EngineFailure:
    """An exception in EngineCore during start-up, and the API server's error that follows."""
    return EngineFailure(
        reason=reason,
        engine_traceback=(
            "EngineCore failed to start.",
            "Traceback (most recent call last):",
            f'  File "{_VLLM}/v1/engine/core.py", in run_engine_core',
            f'  File "{_VLLM}/v1/engine/core.py", in __init__',
            *frames,
            *error,
        ),
        server_traceback=(
            "Traceback (most recent call last):",
            f'  File "{_VLLM}/entrypoints/openai/api_server.py", in run_server',
            f'  File "{_VLLM}/v1/engine/core_client.py", in __init__',
            "RuntimeError: Engine core initialization failed. See root cause above. "
            "Failed core proc(s): {'EngineCore_DP0': 1}",
        ),
    )


def cuda_out_of_memory(profile: MemoryProfile) -> EngineFailure:
    free = int(0.25 * GiB)
    in_use = profile.total - free
    return _engine_core_failed(
        "oom",
        (f'  File "{_VLLM}/v1/worker/gpu_model_runner.py", in load_model',
         '  File "/usr/local/lib/python3.12/dist-packages/torch/nn/modules/module.py", in _apply'),
        (f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
         f"total capacity of {_gib(profile.total):.2f} GiB of which {_gib(free):.2f} GiB is free. "
         f"Including non-PyTorch memory, this process has {_gib(in_use):.2f} GiB memory in use. "
         f"Of the allocated memory {_gib(in_use) - 0.5:.2f} GiB is allocated by PyTorch, and "
         f"0.50 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is "
         f"large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
         f"fragmentation.  See documentation for Memory Management  "
         f"(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",),
    )


def kv_cache_too_small(profile: MemoryProfile, kv_cache: int) -> EngineFailure:
    needed = profile.max_model_len * profile.kv_bytes_per_token
    estimated_max_len = kv_cache // profile.kv_bytes_per_token
    return _engine_core_failed(
        "kv_cache",
        (f'  File "{_VLLM}/v1/core/kv_cache_utils.py", in check_enough_kv_cache_memory',),
        (f"ValueError: To serve at least one request with the model's max seq len "
         f"({profile.max_model_len}), ({_gib(needed):.2f} GiB KV cache is needed, which is larger "
         f"than the available KV cache memory ({_gib(kv_cache):.2f} GiB). Based on the available "
         f"memory, the estimated maximum model length is {estimated_max_len}. Try increasing "
         f"`gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine. "
         f"See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.",),
    )


def no_cache_blocks() -> EngineFailure:
    return _engine_core_failed(
        "no_cache_blocks",
        (f'  File "{_VLLM}/v1/core/kv_cache_utils.py", in check_enough_kv_cache_memory',),
        ("ValueError: No available memory for the cache blocks. Try increasing "
         "`gpu_memory_utilization` when initializing the engine. See "
         "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.",),
    )


def free_memory_too_low(
    profile: MemoryProfile, settings: EngineSettings, free: int
) -> EngineFailure:
    return _engine_core_failed(
        "free_memory",
        (f'  File "{_VLLM}/v1/worker/gpu_worker.py", in init_device',),
        (f"ValueError: Free memory on device cuda:0 "
         f"({_gib(free):.2f}/{_gib(profile.total):.2f} GiB) on startup is less than desired GPU "
         f"memory utilization ({settings.gpu_memory_utilization}, "
         f"{_gib(profile.requested):.2f} GiB). Decrease GPU "
         f"memory utilization or reduce GPU memory used by other processes.",),
    )


def model_not_found(model: str, revision: str | None) -> EngineFailure:
    """What the API server prints when the model is neither a folder nor a Hub repository."""
    return EngineFailure(
        reason="model_not_found",
        engine_traceback=(),
        server_traceback=(
            "Traceback (most recent call last):",
            '  File "/usr/local/lib/python3.12/dist-packages/huggingface_hub/utils/_http.py", '
            "in hf_raise_for_status",
            "huggingface_hub.errors.RepositoryNotFoundError: 404 Client Error. "
            "(Request ID: standin-vllm)",
            "",
            f"Repository Not Found for url: https://huggingface.co/api/models/{model}/revision/"
            f"{revision or 'main'}.",
            "Please make sure you specified the correct `repo_id` and `repo_type`.",
            "If you are trying to access a private or gated repo, make sure you are authenticated.",
            "",
            "The above exception was the direct cause of the following exception:",
            "",
            "Traceback (most recent call last):",
            f'  File "{_VLLM}/transformers_utils/config.py", in get_config',
            '  File "/usr/local/lib/python3.12/dist-packages/transformers/utils/hub.py", '
            "in cached_files",
            f"OSError: {model} is not a local folder and is not a valid model identifier listed on "
            "'https://huggingface.co/models'",
            "If this is a private repository, make sure to pass a token having permission to this "
            "repo either by logging in with `hf auth login` or by passing `token=<your_token>`",
        ),
    )


def engine_crashed() -> EngineFailure:
    """EngineCore dying after start-up; the API server notices and shuts down."""
    return EngineFailure(
        reason="crash_after_ready",
        engine_traceback=(
            "EngineCore encountered a fatal error.",
            "Traceback (most recent call last):",
            f'  File "{_VLLM}/v1/engine/core.py", in run_busy_loop',
            "RuntimeError: CUDA error: an illegal memory access was encountered "
            "(simulated by STANDIN_VLLM_FAIL=crash_after_ready)",
        ),
        server_traceback=(
            "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
            "See stack trace (above) for the root cause.",
        ),
    )
