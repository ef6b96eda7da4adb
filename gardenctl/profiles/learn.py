"""From a worker's start-up log (and NVML) to what it measured, and to a profile (edges: reads
logs and the profile database).

`measure_worker` says what one worker really took: vLLM's own figures from the log of its current
run (gardenctl.measure.vllm_log) and, where NVML reports per-process memory, what its whole
process tree holds on its GPUs. `learn_ready` turns every ready worker's measurement into a
profile in the database, once per run (a run is known by its start time), so that the next plan
sizes that model from the truth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gardenctl.argv import flag_value, split_argv
from gardenctl.inventory.model import Inventory
from gardenctl.measure.vllm_log import StartupReport, read_startup, read_startup_file
from gardenctl.observe import ObservedWorker
from gardenctl.profiles.model import (
    Profile,
    ProfileKey,
    kv_bytes_per_token,
    make_key,
    other_settings,
)
from gardenctl.profiles.store import ProfileStore
from gardenctl.units import format_gib
from gardenctl.vocab import Phase
from gardenctl.workers import DesiredWorker

# A run's log starts with its start-up; the memory lines come within the first few thousand
# lines even at DEBUG level. Reading more would only read request logs.
START_UP_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Measured:
    """What one worker took on each of its GPUs (per tensor-parallel rank); None: unknown."""

    vllm_version: str | None
    weights_bytes: int | None
    kv_cache_bytes: int | None
    kv_cache_tokens: int | None
    max_concurrency: float | None
    cuda_graph_bytes: int | None
    non_kv_bytes: int | None
    gpu_used_bytes: int | None  # NVML: the process tree's memory on its first GPU
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    gpu_total_bytes: int | None = None
    cuda_graph_estimated_bytes: int | None = None  # vLLM's estimate the budget held (0.18+)
    sleep_freed_bytes: int | None = None  # standby: what its first sleep freed on each GPU

    def to_json(self) -> dict[str, Any]:
        return {"vllm_version": self.vllm_version, "weights_bytes": self.weights_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "kv_cache_tokens": self.kv_cache_tokens,
                "max_concurrency": self.max_concurrency,
                "cuda_graph_bytes": self.cuda_graph_bytes, "non_kv_bytes": self.non_kv_bytes,
                "gpu_used_bytes": self.gpu_used_bytes,
                "sleep_freed_bytes": self.sleep_freed_bytes}

    @property
    def complete(self) -> bool:
        """Enough to size the next start from: weights, KV cache and its tokens, non-KV."""
        return None not in (self.weights_bytes, self.kv_cache_bytes, self.kv_cache_tokens,
                            self.non_kv_bytes)


def read_start_up(path: str | Path) -> StartupReport | None:
    """The start-up report of a run's log (its first START_UP_BYTES), None when unreadable."""
    try:
        return read_startup_file(path, START_UP_BYTES, head=True)
    except OSError:
        return None


def measured_from(report: StartupReport, *, utilization: float | None,
                  gpu_total_bytes: int | None, gpu_used_bytes: int | None) -> Measured:
    """Numbers from the log; the log's own utilization and GPU total come first (it is the
    truth of that start), the worker's flag and the inventory only where the log is silent."""
    util = report.gpu_memory_utilization or utilization
    total = report.gpu_total_bytes or gpu_total_bytes
    # The budget less the KV cache: what sizing needs, whatever vLLM's own non-KV figure
    # (DEBUG) counts; the stated figure only where the budget cannot be computed.
    non_kv = (math.ceil(total * util) - report.kv_cache_bytes
              if util and total and report.kv_cache_bytes is not None
              else report.derived_non_kv_bytes(utilization, gpu_total_bytes))
    return Measured(
        vllm_version=report.vllm_version, weights_bytes=report.weights_bytes,
        kv_cache_bytes=report.kv_cache_bytes, kv_cache_tokens=report.kv_cache_tokens,
        max_concurrency=report.max_concurrency, cuda_graph_bytes=report.cuda_graph_bytes,
        non_kv_bytes=non_kv, gpu_used_bytes=gpu_used_bytes, max_model_len=report.max_model_len,
        gpu_memory_utilization=util, gpu_total_bytes=total,
        cuda_graph_estimated_bytes=report.cuda_graph_estimated_bytes,
        sleep_freed_bytes=report.sleep_freed_bytes)


def measure_worker(worker: ObservedWorker, startup_log: str | None,
                   inventory: Inventory | None) -> Measured | None:
    """What ``worker`` took, from the head of its current run's log (``startup_log``, from the
    runtime, wherever the log lives) and NVML; None without a log."""
    report = read_startup(startup_log) if startup_log else None
    gpu = inventory.gpu(worker.node, worker.gpus[0]) if inventory and worker.gpus else None
    used = gpu_used_by(worker, inventory) if inventory is not None else None
    if report is None:
        if used is None:
            return None
        report = read_startup("")
    return measured_from(report, utilization=worker.utilization,
                         gpu_total_bytes=gpu.total_bytes if gpu else None, gpu_used_bytes=used)


def gpu_used_by(worker: ObservedWorker, inventory: Inventory) -> int | None:
    """NVML's per-process memory of the worker's process tree on its first GPU (None where the
    inventory is declared, or the driver does not say per process)."""
    if not inventory.used_includes_ours or not worker.pids or not worker.gpus:
        return None
    gpu = inventory.gpu(worker.node, worker.gpus[0])
    if gpu is None:
        return None
    pids = set(worker.pids)
    held = [p for p in gpu.processes if p.pid in pids]
    if not held or any(p.used_bytes is None for p in held):
        return None
    return sum(p.used_bytes or 0 for p in held)


def key_of(spec: DesiredWorker, *, vllm_version: str | None, gpu_name: str | None) -> ProfileKey:
    """The profile key of a worker, read from its `vllm serve` argv (what vLLM was told)."""
    argv = spec.argv
    _, flags = split_argv(argv)
    return make_key(
        model=spec.model_ref, revision=flag_value(argv, "--revision"),
        vllm_version=vllm_version, gpu_name=gpu_name,
        tensor_parallel_size=int(flag_value(argv, "--tensor-parallel-size") or 1),
        dtype=flag_value(argv, "--dtype"), quantization=flag_value(argv, "--quantization"),
        kv_cache_dtype=flag_value(argv, "--kv-cache-dtype"),
        max_num_seqs=flag_value(argv, "--max-num-seqs"),
        max_num_batched_tokens=flag_value(argv, "--max-num-batched-tokens"),
        enforce_eager="--enforce-eager" in flags, other=other_settings(flags, dict(spec.env)))


def profile_of(measured: Measured, key: ProfileKey, *, measured_at: float, source: str,
               graphs_in_budget: bool) -> Profile | None:
    """A profile from a complete measurement; None when the log did not say enough."""
    if not measured.complete:
        return None
    assert measured.weights_bytes is not None and measured.kv_cache_bytes is not None
    assert measured.kv_cache_tokens is not None and measured.non_kv_bytes is not None
    if measured.kv_cache_tokens <= 0 or measured.kv_cache_bytes <= 0:
        return None
    return Profile(
        key=key, gpu_total_bytes=measured.gpu_total_bytes or 0,
        gpu_memory_utilization=measured.gpu_memory_utilization or 0.0,
        weights_bytes=measured.weights_bytes, non_kv_bytes=measured.non_kv_bytes,
        kv_cache_bytes=measured.kv_cache_bytes, kv_cache_tokens=measured.kv_cache_tokens,
        kv_bytes_per_token=kv_bytes_per_token(measured.kv_cache_bytes,
                                              measured.kv_cache_tokens),
        cuda_graph_bytes=measured.cuda_graph_bytes, max_model_len=measured.max_model_len,
        max_concurrency=measured.max_concurrency, measured_at=measured_at, source=source,
        graphs_in_budget=graphs_in_budget,
        cuda_graph_estimated_bytes=measured.cuda_graph_estimated_bytes)


def learn_ready(workers: Iterable[ObservedWorker], logs: Any, inventory: Inventory,
                store: ProfileStore, versions: Mapping[str, str | None],
                seen: set[tuple[str, float]] | None = None) -> list[Profile]:
    """Record a profile for every ready worker whose run was not learned yet.

    ``logs(worker_id)`` gives the head of a worker's current log (Runtime.startup_log);
    ``versions`` the release each model was planned for (the log's banner wins when it has
    one); ``seen`` remembers runs already learned by this process (a watch), so logs are read
    once per run."""
    learned = []
    for worker in workers:
        if worker.phase != Phase.READY or worker.started_at is None:
            continue
        run = (worker.worker_id, worker.started_at)
        if seen is not None and run in seen:
            continue
        measured = measure_worker(worker, logs(worker.worker_id), inventory)
        if measured is None:
            continue  # no log yet: try again on the next pass
        if seen is not None:  # ready: its start-up lines are all written, complete or not
            seen.add(run)
        if not measured.complete:
            continue  # e.g. vLLM 0.8 logs no KV cache size at INFO level
        gpu = inventory.gpu(worker.node, worker.gpus[0]) if worker.gpus else None
        version = measured.vllm_version or versions.get(worker.model)
        key = key_of(worker.spec, vllm_version=version, gpu_name=gpu.name if gpu else None)
        profile = profile_of(measured, key, measured_at=worker.started_at,
                             source=f"worker {worker.worker_id}",
                             graphs_in_budget=graphs_counted(version, by_gardenctl=True))
        if profile is not None:
            learned.append(store.record(profile))
    return learned


def claim_note(measured: Measured, claim_bytes: int, min_concurrency: int,
               kv_bytes_per_token: int, max_model_len: int, context_bytes: int) -> list[str]:
    """What `status` flags about a worker's measurement against its claim."""
    notes = []
    if measured.gpu_used_bytes is not None and measured.gpu_used_bytes > claim_bytes * 1.02:
        over = measured.gpu_used_bytes - claim_bytes
        notes.append(f"holds {format_gib(over)} more than it claimed: its neighbours are at risk")
    elif measured.gpu_used_bytes is not None and measured.gpu_used_bytes < claim_bytes * 0.75:
        notes.append(f"holds {format_gib(measured.gpu_used_bytes)}, far less than the "
                     f"{format_gib(claim_bytes)} it claimed: "
                     f"{format_gib(claim_bytes - measured.gpu_used_bytes)} could serve other "
                     "models")
    if measured.max_concurrency is not None and measured.max_concurrency < min_concurrency:
        notes.append(f"maximum concurrency {measured.max_concurrency:.2f} is below "
                     f"min_concurrency {min_concurrency}")
    if measured.non_kv_bytes is not None and kv_bytes_per_token and max_model_len:
        needed = (measured.non_kv_bytes + context_bytes
                  + math.ceil(min_concurrency * max_model_len * kv_bytes_per_token))
        if needed < claim_bytes * 0.75 and not notes:
            notes.append(f"needs {format_gib(needed)} for min_concurrency {min_concurrency} but "
                         f"claims {format_gib(claim_bytes)}: "
                         f"{format_gib(claim_bytes - needed)} could serve other models")
    return notes




def import_log(path: str | Path, store: ProfileStore, *, gpu_name: str,
               gpu_total_bytes: int | None, model: str | None, vllm_version: str | None,
               measured_at: float) -> Profile:
    """Learn from a vLLM start-up log a user already has (`gardenctl profiles import`)."""
    from gardenctl.errors import GardenError

    report = read_start_up(path)
    if report is None:
        raise GardenError(f"{path}: cannot be read")
    args = report.args
    ref = model or report.model
    if not ref:
        raise GardenError(f"{path}: the log does not name its model (no `non-default args` "
                          "line with 'model'); give --model")
    measured = measured_from(report, utilization=None, gpu_total_bytes=gpu_total_bytes,
                             gpu_used_bytes=None)
    if not measured.complete:
        missing = [name for name in ("weights_bytes", "kv_cache_bytes", "kv_cache_tokens",
                                     "non_kv_bytes") if getattr(measured, name) is None]
        hint = (" (the budget needs the utilization and the GPU total: give --gpu-memory)"
                if "non_kv_bytes" in missing else "")
        raise GardenError(f"{path}: the log lacks what a profile needs: "
                          f"{', '.join(missing)}{hint}; is it a complete start-up?")
    version = report.vllm_version or vllm_version
    if not version:
        raise GardenError(f"{path}: the log has no version banner; give --vllm-version")
    key = make_key(
        model=ref, revision=_text(args.get("revision")), vllm_version=version,
        gpu_name=gpu_name,
        tensor_parallel_size=report.tensor_parallel_size or 1,
        dtype=_text(args.get("dtype")), quantization=_text(args.get("quantization")),
        kv_cache_dtype=_text(args.get("kv_cache_dtype")),
        max_num_seqs=_text(args.get("max_num_seqs")),
        max_num_batched_tokens=_text(args.get("max_num_batched_tokens")),
        enforce_eager=bool(args.get("enforce_eager")), other=other_settings(_as_flags(args), {}))
    profile = profile_of(measured, key, measured_at=measured_at,
                         source=f"imported {Path(path).name}",
                         graphs_in_budget=graphs_counted(version, by_gardenctl=False))
    if profile is None:
        raise GardenError(f"{path}: the log reports no KV cache to learn from")
    return store.record(profile)


def graphs_counted(version: str | None, *, by_gardenctl: bool) -> bool:
    """Did a start of ``version`` count the CUDA-graph pool inside its budget? From 0.18 when
    VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1: gardenctl always sets it; a user's own run had
    vLLM's default, on from 0.20 (docs/vllm.md section 1)."""
    from gardenctl.errors import GardenError
    from gardenctl.estimate.releases import parse_version, traits_for

    traits, _, _ = traits_for(version)
    if by_gardenctl or not version:
        return traits.graphs_in_budget
    try:
        return traits.graphs_in_budget and parse_version(version) >= (0, 20, 0)
    except GardenError:  # not a version: what traits_for assumed
        return traits.graphs_in_budget


def _as_flags(args: Mapping[str, object]) -> dict[str, str]:
    """vLLM's logged `non-default args` as the flags that set them (True: a switch)."""
    import json

    flags = {}
    for name, value in args.items():
        if value is False or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags[flag] = ""
        elif isinstance(value, (dict, list)):
            flags[flag] = json.dumps(value, sort_keys=True, separators=(",", ":"))
        else:
            flags[flag] = str(value)
    return flags


def _text(value: object) -> str | None:
    return None if value is None or value == "auto" else str(value)
