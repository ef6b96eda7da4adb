"""Realistic, seeded fleets and gardens for the benchmarks (not a benchmark itself).

Shared by planner_scale.py, packing_quality.py and cli_latency.py:

- GPU_TYPES: GPU models as torch / NVML report their total memory;
- MODEL_MIX: public models of the built-in catalog (0.6B to 72B, dense and MoE, some quantized:
  AWQ, w4a16, w8a8, fp8), weighted the way a shared lab or company fleet looks: many small and
  7-9B models, fewer 12-34B ones, a few 70B-class ones that need tensor parallelism;
- random_models(): model entries (name, catalog id, max_model_len 2k-32k capped at the model's
  own limit, min_concurrency, replicas, tensor_parallel_size = the smallest power of two whose
  per-GPU estimate fits the fleet's largest GPU, sometimes doubled, kv_cache_dtype fp8 now and
  then); every number comes from gardenctl's real estimator on the catalog's config.json values;
- garden_yaml(): a garden.yaml text with a declared inventory, in block style (one key a line,
  as people write it) or flow style (one line per model); with flow style and short names
  (m00042), 10,000 models take ~0.98 MB, just under the loader's 1 MiB limit
  (gardenctl.spec.yamlsource.MAX_FILE_BYTES): block style or descriptive names would not fit;
- machine(): where the numbers were taken (for RESULTS.md).

Everything is deterministic for a given seed. Metadata is read with read_model_metadata, the same
call gardenctl makes; use_catalog_only() points the Hugging Face cache at a folder that cannot
exist first, so that the numbers do not depend on what happens to be cached on the machine (what
a CI machine sees: the built-in catalog).
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gardenctl.estimate import (  # noqa: E402
    EstimateRequest,
    MemoryEstimate,
    estimate_memory,
    read_model_metadata,
)
from gardenctl.estimate.types import ModelMetadata  # noqa: E402
from gardenctl.units import GiB  # noqa: E402


@dataclass(frozen=True)
class GpuType:
    key: str
    name: str
    memory_gib: float  # total memory as torch.cuda reports it


GPU_TYPES = {
    "H100": GpuType("H100", "NVIDIA H100 80GB HBM3", 79.19),
    "A100-40": GpuType("A100-40", "NVIDIA A100-SXM4-40GB", 39.39),
    "L40S": GpuType("L40S", "NVIDIA L40S", 44.39),
    "A10G": GpuType("A10G", "NVIDIA A10G", 22.06),
    "L4": GpuType("L4", "NVIDIA L4", 22.03),
}

# (catalog id, weight): a fleet's mix of model sizes. Quantized variants are catalog aliases.
MODEL_MIX: tuple[tuple[str, float], ...] = (
    # small: 0.6B - 4B
    ("Qwen/Qwen3-0.6B", 5),
    ("Qwen/Qwen2.5-1.5B-Instruct", 4),
    ("google/gemma-2-2b-it", 3),
    ("ibm-granite/granite-3.1-2b-instruct", 3),
    ("ibm-granite/granite-vision-3.3-2b", 2),
    ("microsoft/phi-2", 2),
    ("google/gemma-3-4b-it", 4),
    # 7B - 9B (and gpt-oss-20b, a sparse MoE of that footprint)
    ("Qwen/Qwen2.5-7B-Instruct", 6),
    ("Qwen/Qwen2.5-7B-Instruct-AWQ", 3),
    ("RedHatAI/Qwen2.5-7B-Instruct-fp8-dynamic", 2),
    ("meta-llama/Llama-3.1-8B-Instruct", 7),
    ("RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w4a16", 2),
    ("RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w8a8", 2),
    ("Qwen/Qwen3-8B", 6),
    ("Qwen/Qwen3-8B-AWQ", 2),
    ("google/gemma-2-9b-it", 2),
    ("ibm-granite/granite-3.1-8b-instruct", 2),
    ("openai/gpt-oss-20b", 3),
    # 12B - 34B
    ("google/gemma-3-12b-it", 3),
    ("Qwen/Qwen3-14B", 3),
    ("microsoft/phi-4", 2),
    ("mistralai/Mistral-Small-3.1-24B-Instruct-2503", 2),
    ("RedHatAI/Mistral-Small-3.1-24B-Instruct-2503-quantized.w8a8", 1),
    ("google/gemma-3-27b-it", 2),
    ("Qwen/Qwen3-30B-A3B", 2),
    ("Qwen/Qwen3-32B", 2),
    ("codellama/CodeLlama-34b-hf", 1),
    ("Qwen/Qwen2.5-72B-Instruct-AWQ", 1),
    # 46B - 72B
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", 1),
    ("meta-llama/Llama-3.3-70B-Instruct", 3),
    ("RedHatAI/Llama-3.3-70B-Instruct-fp8-dynamic", 2),
    ("Qwen/Qwen2.5-72B-Instruct", 1),
)

CONTEXT_LENGTHS = ((2048, 15), (4096, 30), (8192, 30), (16384, 15), (32768, 10))
CONCURRENCY = ((1, 50), (2, 25), (4, 20), (8, 5))
REPLICAS = ((1, 75), (2, 17), (3, 5), (4, 3))
DEFAULT_MAX_MODEL_LEN = 8192  # the generated gardens' `defaults: max_model_len`
FIT_FRACTION = 0.85  # TP is the smallest power of two whose per-GPU total is under this share


NO_HF_CACHE = str(Path(os.devnull) / "hf-cache")  # a folder that cannot exist


def use_catalog_only() -> None:
    """Point the Hugging Face cache at a folder that cannot exist: metadata then comes from the
    built-in catalog, as on a CI machine, whatever this machine has cached. Call before
    estimating (in this process; subprocesses inherit it)."""
    os.environ["HF_HUB_CACHE"] = NO_HF_CACHE
    os.environ["HF_HUB_OFFLINE"] = "1"


@functools.cache
def metadata(model_id: str) -> ModelMetadata:
    return read_model_metadata(model_id)


@functools.cache
def context_limit(model_id: str) -> int:
    return estimate_memory(EstimateRequest(model=model_id), metadata(model_id)).max_model_len


@functools.cache
def estimate(model_id: str, max_model_len: int, tp: int = 1, min_concurrency: int = 1,
             kv_cache_dtype: str = "auto") -> MemoryEstimate:
    request = EstimateRequest(model=model_id, max_model_len=max_model_len,
                              tensor_parallel_size=tp, min_concurrency=min_concurrency,
                              kv_cache_dtype=kv_cache_dtype)
    return estimate_memory(request, metadata(model_id))


@dataclass(frozen=True)
class ModelEntry:
    """One model of a generated garden (only the fields the generator varies)."""

    name: str
    model: str
    max_model_len: int
    min_concurrency: int = 1
    tensor_parallel_size: int = 1
    replicas: int = 1
    kv_cache_dtype: str = "auto"

    @property
    def estimate(self) -> MemoryEstimate:
        return estimate(self.model, self.max_model_len, self.tensor_parallel_size,
                        self.min_concurrency, self.kv_cache_dtype)

    @property
    def workers(self) -> int:
        return self.replicas

    def yaml(self, style: str = "flow") -> str:
        if style == "block":
            lines = [f"  - name: {self.name}", f"    model: {self.model}"]
            lines += [f"    {key}: {value}" for key, value in self._settings()]
            return "\n".join(lines)
        parts = [f"name: {self.name}", f"model: {self.model}"]
        parts += [f"{key}: {value}" for key, value in self._settings()]
        return "  - {" + ", ".join(parts) + "}"

    def _settings(self) -> list[tuple[str, object]]:
        parts = []
        if self.max_model_len != DEFAULT_MAX_MODEL_LEN:
            parts.append(("max_model_len", self.max_model_len))
        if self.min_concurrency != 1:
            parts.append(("min_concurrency", self.min_concurrency))
        if self.tensor_parallel_size != 1:
            parts.append(("tensor_parallel_size", self.tensor_parallel_size))
        if self.replicas != 1:
            parts.append(("replicas", self.replicas))
        if self.kv_cache_dtype != "auto":
            parts.append(("kv_cache_dtype", self.kv_cache_dtype))
        return parts


def _pick(rng: random.Random, table) -> object:
    values, weights = zip(*table, strict=True)
    return rng.choices(values, weights=weights)[0]


def random_model(rng: random.Random, number: int, largest_gpu_gib: float, gpus_per_node: int,
                 *, replicas: bool = True, mix=MODEL_MIX) -> ModelEntry:
    """A realistic model entry; its TP makes its per-GPU estimate fit the largest GPU."""
    while True:
        model_id = _pick(rng, mix)
        length = min(_pick(rng, CONTEXT_LENGTHS), context_limit(model_id))
        concurrency = _pick(rng, CONCURRENCY)
        kv_dtype = "fp8" if rng.random() < 0.1 else "auto"
        tp = 1
        while tp <= gpus_per_node:
            need = estimate(model_id, length, tp, concurrency, kv_dtype).total_bytes
            if need <= FIT_FRACTION * largest_gpu_gib * GiB:
                break
            tp *= 2
        if tp > gpus_per_node:
            continue  # too big for this fleet: draw again
        if tp < gpus_per_node and tp >= 2 and rng.random() < 0.2:
            tp *= 2  # more GPUs than needed, for throughput
        count = _pick(rng, REPLICAS) if replicas else 1
        return ModelEntry(name=f"m{number:05d}", model=model_id,
                          max_model_len=length, min_concurrency=concurrency,
                          tensor_parallel_size=tp, replicas=count, kv_cache_dtype=kv_dtype)


def random_models(seed: int, count: int, largest_gpu_gib: float, gpus_per_node: int,
                  *, replicas: bool = True) -> list[ModelEntry]:
    rng = random.Random(seed)
    return [random_model(rng, i, largest_gpu_gib, gpus_per_node, replicas=replicas)
            for i in range(count)]


@dataclass(frozen=True)
class NodeGroup:
    """``count`` nodes named ``prefix-NNNN``, each with ``gpus`` GPUs of one type."""

    prefix: str
    count: int
    gpu: GpuType
    gpus: int = 8
    used_gib: float = 0.0  # memory used by processes that are not ours, per GPU

    def yaml(self) -> list[str]:
        used = f", used: {self.used_gib}GiB" if self.used_gib else ""
        return [f"    - {{name: {self.prefix}-{i:04d}, gpus: [{{name: {self.gpu.name}, "
                f"memory: {self.gpu.memory_gib}GiB, count: {self.gpus}{used}}}]}}"
                for i in range(self.count)]


@dataclass(frozen=True)
class Fleet:
    groups: tuple[NodeGroup, ...]

    @property
    def nodes(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def gpus(self) -> int:
        return sum(g.count * g.gpus for g in self.groups)

    @property
    def memory_gib(self) -> float:
        return sum(g.count * g.gpus * (g.gpu.memory_gib - g.used_gib) for g in self.groups)

    def describe(self) -> str:
        return " + ".join(f"{g.count} x {g.gpus} {g.gpu.key}"
                          + (f" ({g.used_gib:g} GiB used by others)" if g.used_gib else "")
                          for g in self.groups if g.count)


def scale_fleet(nodes: int) -> Fleet:
    """A mixed data-centre fleet of ``nodes`` 8-GPU nodes: 3/4 H100 (1/8 of those with 2 GiB
    already used by other processes), 1/4 L40S."""
    h100 = nodes * 3 // 4
    busy = h100 // 8
    return Fleet((
        NodeGroup("h100", h100 - busy, GPU_TYPES["H100"]),
        NodeGroup("h100b", busy, GPU_TYPES["H100"], used_gib=2.0),
        NodeGroup("l40s", nodes - h100, GPU_TYPES["L40S"]),
    ))


def demand_gib(models: list[ModelEntry]) -> float:
    """Memory the models' workers need (estimate total per GPU x TP x replicas)."""
    return sum(m.estimate.total_bytes * m.tensor_parallel_size * m.replicas
               for m in models) / GiB


def garden_yaml(name: str, models: list[ModelEntry], fleet: Fleet, *,
                reserve: str = "1GiB", min_available: float = 0.3, style: str = "flow") -> str:
    """The garden file; ``style`` "block" writes each model as a person would (one key a line),
    "flow" one line per model (compact: what 10,000 models need to fit in 1 MiB)."""
    lines = [
        f"name: {name}",
        "defaults:",
        f"  max_model_len: {DEFAULT_MAX_MODEL_LEN}",
        '  env: {HF_TOKEN: "${HF_TOKEN}"}',
        "placement:",
        f"  min_available_gpu_fraction: {min_available}",
        f"  reserve: {reserve}",
        "inventory:",
        "  nodes:",
    ]
    for group in fleet.groups:
        lines += group.yaml()
    lines.append("models:")
    lines += [m.yaml(style) for m in models]
    return "\n".join(lines) + "\n"


# --- where the numbers were taken -------------------------------------------------------------

@dataclass(frozen=True)
class Machine:
    uname: str
    cpu: str
    cores: int
    python: str
    date: str
    extra: dict = field(default_factory=dict)

    def markdown(self) -> str:
        return (f"Machine: `{self.uname}`; CPU: {self.cpu}, {self.cores} cores; "
                f"Python {self.python}; {self.date}.")


def machine() -> Machine:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        uname = subprocess.run(["uname", "-a"], capture_output=True, text=True,
                               check=False).stdout.strip()
    except OSError:
        uname = " ".join(platform.uname())
    return Machine(uname=uname, cpu=cpu, cores=os.cpu_count() or 0,
                   python=platform.python_version(),
                   date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]
