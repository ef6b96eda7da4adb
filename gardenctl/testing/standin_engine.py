"""The simulated engine start-up: GPU memory accounting and the log lines and errors of vLLM.

Pure functions: ``simulate_startup`` turns the engine settings and an optional injected
failure into the lines vLLM would log and, if start-up fails, the error it would print.

Memory on one simulated GPU per rank (see docs/vllm.md section 1):
budget = ceil(total x gpu_memory_utilization) (a float product before 0.14); KV cache =
budget - weights/TP - activation peak - non-torch memory, minus the CUDA-graph estimate when
vLLM subtracts it (0.18+ with VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS true, its default from
0.20; never with --enforce-eager), or exactly --kv-cache-memory-bytes when given. Before that
the graph pool is captured after the KV cache is sized, outside the budget. The constants are
those vLLM reported for CodeLlama-7b on an H100 (tests/data/vllm-startup-memory-calibration.csv,
row 2) and the TP>=2 figures of docs/vllm.md; activation and graph pool can be changed
(``STANDIN_VLLM_ACTIVATION``, ``STANDIN_VLLM_CUDA_GRAPH``). Like vLLM, start-up fails on its
own when the numbers say so: free memory below the budget, no memory left for the KV cache,
or less KV cache than one max_model_len sequence needs. Free memory at start-up is the total
minus the CUDA context: the simulated GPU has no other tenants.

The lines follow the release in ``EngineSettings.vllm_version`` (0.8 to 0.33; docs/vllm.md
section 9 lists each format and its source): weights line, V0's multi-line profile and block
count (<= 0.10.2 with VLLM_USE_V1=0), V1's ``Available KV cache memory`` (0.9.1+), KV size and
concurrency on two lines or one (0.28+), graph estimate and pool (0.18+), the free-memory
summary (INFO in 0.10.2 and 0.27+, DEBUG between), and the DEBUG profile line.
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
DEFAULT_VLLM_VERSION = (0, 32, 0)
Version = tuple[int, ...]

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
    vllm_version: Version = DEFAULT_VLLM_VERSION  # the release whose lines are printed
    use_v1: bool = True  # VLLM_USE_V1 (the V0 engine exists up to 0.10.2)
    debug: bool = False  # VLLM_LOGGING_LEVEL=DEBUG
    activation_bytes: int = ACTIVATION_PEAK_BYTES
    cuda_graph_bytes: int = CUDA_GRAPH_POOL_BYTES
    # VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS; None: the release's default
    estimate_cudagraphs: bool | None = None

    @property
    def v0(self) -> bool:
        """The V0 engine runs: VLLM_USE_V1=0 on a release that still has it."""
        return not self.use_v1 and self.vllm_version < (0, 11)

    @property
    def graphs_in_budget(self) -> bool:
        """vLLM subtracts a CUDA-graph estimate from the budget before sizing the KV cache."""
        if self.enforce_eager or self.v0 or self.vllm_version < (0, 18):
            return False
        if self.estimate_cudagraphs is not None:
            return self.estimate_cudagraphs
        return self.vllm_version >= (0, 20)


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
    graphs_in_budget: bool = True

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
    profile: MemoryProfile | None = None  # what a successful start reported


def profile_memory(settings: EngineSettings) -> MemoryProfile:
    tp = settings.tensor_parallel_size
    tp_key = 1 if tp == 1 else 2
    total = settings.gpu_total_bytes
    if settings.vllm_version >= (0, 14):
        requested = math.ceil(total * settings.gpu_memory_utilization)
    else:
        requested = int(total * settings.gpu_memory_utilization)
    weights = math.ceil(settings.weights_bytes / tp)
    cuda_graphs = 0 if settings.enforce_eager else settings.cuda_graph_bytes
    in_budget = settings.graphs_in_budget
    per_token = math.ceil(settings.kv_bytes_per_token / tp)
    if settings.kv_cache_dtype.startswith("fp8"):
        per_token = math.ceil(per_token / 2)
    if settings.kv_cache_memory_bytes is not None:
        kv_cache = settings.kv_cache_memory_bytes
    else:
        kv_cache = (requested - weights - settings.activation_bytes - NON_TORCH_BYTES[tp_key]
                    - (cuda_graphs if in_budget else 0))
    kv_tokens = max(0, kv_cache) // per_token // BLOCK_SIZE * BLOCK_SIZE
    return MemoryProfile(
        total=total,
        free_at_start=total - CUDA_CONTEXT_BYTES[tp_key],
        requested=requested,
        weights=weights,
        activation_peak=settings.activation_bytes,
        non_torch=NON_TORCH_BYTES[tp_key],
        cuda_graphs=cuda_graphs,
        kv_cache=kv_cache,
        kv_bytes_per_token=per_token,
        kv_tokens=kv_tokens,
        max_model_len=settings.max_model_len,
        graphs_in_budget=in_budget,
    )


def simulate_startup(settings: EngineSettings, fail: str | None) -> StartupResult:
    """The lines logged while the engine starts, and the failure that ends it, if any."""
    profile = profile_memory(settings)
    lines = Lines(settings)
    if fail == "model_not_found":
        return StartupResult((), model_not_found(settings.model, settings.revision))
    if fail == "free_memory":
        return StartupResult((), free_memory_too_low(profile, settings, profile.requested // 2))
    if profile.free_at_start < profile.requested:
        return StartupResult((), free_memory_too_low(profile, settings, profile.free_at_start))
    lines.engine_init()
    lines.info("gpu_model_runner.py", f"Starting to load model {settings.model}...")
    if fail == "oom":
        return StartupResult(lines.done(), cuda_out_of_memory(profile))
    lines.weights(profile)
    kv_cache = profile.kv_cache
    if fail == "no_cache_blocks":
        kv_cache = min(kv_cache, 0)
    elif fail == "kv_cache":
        kv_cache = min(kv_cache, profile.max_model_len * profile.kv_bytes_per_token // 2)
    lines.kv_budget(profile, kv_cache)
    if kv_cache <= 0:
        return StartupResult(lines.done(), no_cache_blocks())
    needed = profile.max_model_len * profile.kv_bytes_per_token
    if needed > kv_cache:
        return StartupResult(lines.done(), kv_cache_too_small(profile, kv_cache))
    lines.kv_size(profile)
    lines.graphs_and_summary(profile)
    return StartupResult(lines.done(), None, profile)


def format_gib(n_bytes: int) -> str:
    """vLLM's ``format_gib`` (0.14+): GiB rounded to 2 places, printed with ``%s``."""
    return str(round(n_bytes / GiB, 2))


class Lines:
    """The engine's start-up lines in the format of one vLLM release (docs/vllm.md section 9)."""

    def __init__(self, settings: EngineSettings) -> None:
        self.s = settings
        self.v = settings.vllm_version
        self._lines: list[LogLine] = []

    def done(self) -> tuple[LogLine, ...]:
        return tuple(self._lines)

    def info(self, source: str, message: str) -> None:
        self._lines.append(LogLine("engine", "INFO", source, message))

    def debug(self, source: str, message: str) -> None:
        if self.s.debug:
            self._lines.append(LogLine("engine", "DEBUG", source, message))

    def _gib(self, n_bytes: int) -> str:
        return format_gib(n_bytes) if self.v >= (0, 14) else f"{_gib(n_bytes):.2f}"

    def engine_init(self) -> None:
        s = self.s
        kind = "V0" if s.v0 else "V1"
        version = ".".join(str(part) for part in self.v)
        self.info("core.py", f"Initializing a {kind} LLM engine (v{version}) with config: "
                             f"model='{s.model}', tokenizer='{s.model}', revision={s.revision}, "
                             f"max_seq_len={s.max_model_len}, "
                             f"tensor_parallel_size={s.tensor_parallel_size}, "
                             f"enforce_eager={s.enforce_eager}, kv_cache_dtype={s.kv_cache_dtype}")

    def weights(self, p: MemoryProfile) -> None:
        seconds = self.s.load_seconds
        if self.v <= (0, 8, 2):
            text = f"{_gib(p.weights):.4f} GB and"
        elif self.v < (0, 11, 1) or self.s.v0:
            text = f"{_gib(p.weights):.4f} GiB and"
        elif self.v < (0, 14):
            text = f"{_gib(p.weights):.4f} GiB memory and"
        else:
            text = f"{format_gib(p.weights)} GiB memory and"
        source = "model_runner.py" if self.s.v0 else "gpu_model_runner.py"
        self.info(source, f"Model loading took {text} {seconds:.6f} seconds")

    def kv_budget(self, p: MemoryProfile, kv_cache: int) -> None:
        if self.s.v0:
            self._v0_profile(p, kv_cache)
            return
        if self.v >= (0, 18) and not self.s.enforce_eager:
            self.info("gpu_model_runner.py",
                      f"Estimated CUDA graph memory: {_gib(p.cuda_graphs):.2f} GiB total")
        if self.v >= (0, 9, 1):
            non_kv = p.weights + p.activation_peak + p.non_torch
            if self.v >= (0, 29):
                detail = (f"total consumed (from mem_get_info): "
                          f"{self._gib(p.weights + p.non_torch)}GiB")
            else:
                detail = f"non-torch forward increase memory: {self._gib(p.non_torch)}GiB"
            self.debug("gpu_worker.py",
                       f"Memory profiling takes {self.s.load_seconds:.2f} seconds. Total non KV "
                       f"cache memory: {self._gib(non_kv)}GiB; torch peak memory increase: "
                       f"{self._gib(p.activation_peak)}GiB; {detail}; weights memory: "
                       f"{self._gib(p.weights)}GiB.")
            kv = format_gib(kv_cache) if self.v >= (0, 32) else f"{_gib(kv_cache):.2f}"
            self.info("gpu_worker.py", f"Available KV cache memory: {kv} GiB")

    def _v0_profile(self, p: MemoryProfile, kv_cache: int) -> None:
        util = self.s.gpu_memory_utilization
        for message in (
            f"Memory profiling takes {self.s.load_seconds:.2f} seconds",
            f"the current vLLM instance can use total_gpu_memory ({_gib(p.total):.2f}GiB) x "
            f"gpu_memory_utilization ({util:.2f}) = {_gib(p.requested):.2f}GiB",
            f"model weights take {_gib(p.weights):.2f}GiB; non_torch_memory takes "
            f"{_gib(p.non_torch):.2f}GiB; PyTorch activation peak memory takes "
            f"{_gib(p.activation_peak):.2f}GiB; the rest of the memory reserved for KV Cache "
            f"is {_gib(kv_cache):.2f}GiB.",
        ):
            self.info("worker.py", message)

    def kv_size(self, p: MemoryProfile) -> None:
        if self.s.v0:
            blocks = p.kv_tokens // BLOCK_SIZE
            self.info("executor_base.py", f"# cuda blocks: {blocks}, # CPU blocks: 0")
            self.info("executor_base.py",
                      f"Maximum concurrency for {p.max_model_len} tokens per request: "
                      f"{p.max_concurrency:.2f}x")
            return
        size = f"GPU KV cache size: {p.kv_tokens:,} tokens"
        concurrency = (f"Maximum concurrency for {p.max_model_len:,} tokens per request: "
                       f"{p.max_concurrency:.2f}x")
        if self.v >= (0, 28):
            self.info("kv_cache_utils.py", f"{size}, {concurrency}")
        else:
            self.info("kv_cache_utils.py", size)
            self.info("kv_cache_utils.py", concurrency)

    def graphs_and_summary(self, p: MemoryProfile) -> None:
        if not self.s.enforce_eager:
            source = "model_runner.py" if self.s.v0 else "gpu_model_runner.py"
            self.info(source, f"Graph capturing finished in 1 secs, "
                              f"took {_gib(p.cuda_graphs):.2f} GiB")
            if self.v >= (0, 18) and not self.s.v0:
                self.info("gpu_worker.py",
                          f"CUDA graph pool memory: {self._gib(p.cuda_graphs)} GiB (actual), "
                          f"{self._gib(p.cuda_graphs)} GiB (estimated), difference: 0.0 GiB "
                          f"(0.0%).")
        if not self.s.v0 and self.v >= (0, 10, 2):
            self._free_memory_summary(p)
        took = f"{self.s.load_seconds:.2f} " + ("seconds" if self.v < (0, 20) else "s")
        self.info("core.py", f"init engine (profile, create kv cache, warmup model) took {took}")

    def _free_memory_summary(self, p: MemoryProfile) -> None:
        kv = max(0, p.kv_cache)
        if self.v >= (0, 29):
            usage = (f"{_gib(p.weights + p.non_torch):.2f} GiB for consumed memory (weights + "
                     f"non-torch), {_gib(p.activation_peak):.2f} GiB for peak activation, and "
                     f"{_gib(p.cuda_graphs):.2f} GiB for CUDAGraph memory")
        else:
            usage = (f"{_gib(p.weights):.2f} GiB for weight, {_gib(p.activation_peak):.2f} GiB "
                     f"for peak activation, {_gib(p.non_torch):.2f} GiB for non-torch memory, "
                     f"and {_gib(p.cuda_graphs):.2f} GiB for CUDAGraph memory")
        fit = p.requested - (p.weights + p.activation_peak + p.non_torch + p.cuda_graphs)
        full = p.free_at_start - (p.weights + p.activation_peak + p.non_torch + p.cuda_graphs)
        message = (f"Free memory on device ({_gib(p.free_at_start):.2f}/{_gib(p.total):.2f} GiB) "
                   f"on startup. Desired GPU memory utilization is "
                   f"({self.s.gpu_memory_utilization}, {_gib(p.requested):.2f} GiB). Actual usage "
                   f"is {usage}. Replace gpu_memory_utilization config with "
                   f"`--kv-cache-memory={fit}` ({_gib(fit):.2f} GiB) to fit into requested "
                   f"memory, or `--kv-cache-memory={full}` ({_gib(full):.2f} GiB) to fully "
                   f"utilize gpu memory. Current kv cache memory in use is {_gib(kv):.2f} GiB.")
        if self.v == (0, 10, 2) or self.v >= (0, 27):
            self.info("gpu_worker.py", message)
        else:
            self.debug("gpu_worker.py", message)


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


def engine_out_of_memory(error: str) -> EngineFailure:
    """EngineCore dying after start-up because an allocation failed (torch's message given)."""
    return EngineFailure(
        reason="oom_after_ready",
        engine_traceback=(
            "EngineCore encountered a fatal error.",
            "Traceback (most recent call last):",
            f'  File "{_VLLM}/v1/engine/core.py", in run_busy_loop',
            f"torch.OutOfMemoryError: {error}",
        ),
        server_traceback=(
            "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
            "See stack trace (above) for the root cause.",
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
