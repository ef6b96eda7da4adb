"""Measured-profile sizing against what vLLM needed, next to the static estimate.

    python benchmarks/profile_sizing.py

For every successful start-up in tests/data/vllm-startup-memory-calibration.csv that logged its
whole profile (weights, activation peak, non-torch memory, KV cache and its tokens):

1. its start-up is written as vLLM of that row's release prints it at INFO level (the stand-in's
   per-release formats, gardenctl.testing.standin_engine.Lines: rounded as vLLM rounds),
2. read back with gardenctl's log reader (gardenctl.measure.vllm_log) and learned as a profile
   exactly as `gardenctl profiles import` does (non-KV = the log's own budget less its KV cache;
   the graph pool outside that budget for a user's run before 0.20),
3. the same model is then sized for a *different* request, min_concurrency 1 and 4 at the row's
   max_model_len, from the profile and from the static estimate (the row's release),
4. and both are compared with what vLLM needs for that request under gardenctl (which sets
   VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1): the budget ceil(total x F) must cover weights +
   activation peak + non-torch memory + the CUDA-graph pool where the release counts it in the
   budget + the KV cache of min_concurrency x max_model_len tokens at the row's own bytes per
   token (its KV GiB / its tokens).

Error = sized / needed - 1 (negative: vLLM would start with fewer sequences than asked, or not
at all). The profile's error is what learning from an INFO log loses to rounding (2-decimal
GiB, whole blocks) and to the graph pool's actual vs estimated size; the estimate's error is the
static model's.
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from estimator_accuracy import load_rows, number, request_for, row_version  # noqa: E402

from gardenctl.estimate import estimate_memory  # noqa: E402
from gardenctl.estimate.catalog import catalog_metadata, load_catalog  # noqa: E402
from gardenctl.estimate.releases import parse_version, traits_for  # noqa: E402
from gardenctl.measure.vllm_log import read_startup  # noqa: E402
from gardenctl.profiles.learn import (  # noqa: E402
    graphs_counted,
    measured_from,
    profile_of,
)
from gardenctl.profiles.model import make_key  # noqa: E402
from gardenctl.profiles.sizing import size_from_profile  # noqa: E402
from gardenctl.testing.standin_engine import EngineSettings, Lines, MemoryProfile  # noqa: E402
from gardenctl.units import GiB  # noqa: E402

CONCURRENCY = (1, 4)
BLOCK = 16


def _bytes(gib: float | None) -> int:
    return round((gib or 0.0) * GiB)


def start_up_log(row: dict[str, str], version: str) -> str:
    """The row's start-up at INFO level, in its release's format, from the row's figures."""
    parsed = parse_version(version)
    total = _bytes(number(row["gpu_total_gib"]))
    util = float(row["gpu_memory_utilization"])
    kv = _bytes(number(row["kv_cache_gib"]))
    tokens = int(number(row["kv_tokens"]) or 0)
    max_len = int(number(row["max_model_len"]) or 0)
    graphs = _bytes(max(0.0, number(row["cuda_graph_actual_gib"]) or 0.0))
    v0 = row["engine"] == "V0"
    settings = EngineSettings(
        model=row["model_id"], revision=None, gpu_total_bytes=total, weights_bytes=0,
        kv_bytes_per_token=max(1, kv // max(1, tokens)), tensor_parallel_size=1,
        gpu_memory_utilization=util, kv_cache_memory_bytes=None,
        kv_cache_dtype=row["kv_cache_dtype"] or "auto", max_model_len=max_len,
        enforce_eager=row["enforce_eager"] == "True", load_seconds=1.0,
        vllm_version=parsed, use_v1=not v0)
    profile = MemoryProfile(
        total=total, free_at_start=_bytes(number(row["init_free_gib"])) or total,
        requested=math.ceil(total * util), weights=_bytes(number(row["weights_gib"])),
        activation_peak=_bytes(number(row["activation_peak_gib"])),
        non_torch=_bytes(number(row["non_torch_gib"])), cuda_graphs=graphs, kv_cache=kv,
        kv_bytes_per_token=max(1, kv // max(1, tokens)), kv_tokens=tokens,
        max_model_len=max_len)
    lines = Lines(settings)
    lines.weights(profile)
    lines.kv_budget(profile, kv)
    lines.kv_size(profile)
    lines.graphs_and_summary(profile)
    return "\n".join(line.message for line in lines.done())


def needed(row: dict[str, str], version: str, tokens: int) -> int:
    """The budget vLLM needs under gardenctl for ``tokens`` of KV cache."""
    traits, _, _ = traits_for(version)
    per_token = _bytes(number(row["kv_cache_gib"])) / int(number(row["kv_tokens"]) or 1)
    graphs = 0
    if traits.graphs_in_budget and row["enforce_eager"] != "True":
        estimated = number(row["cuda_graph_estimated_gib"])
        actual = number(row["cuda_graph_actual_gib"])
        graphs = _bytes(max(0.0, estimated if estimated is not None else actual or 0.0))
    return (_bytes(number(row["weights_gib"])) + _bytes(number(row["activation_peak_gib"]))
            + _bytes(number(row["non_torch_gib"])) + graphs + math.ceil(tokens * per_token))


def usable(row: dict[str, str]) -> bool:
    keys = ("weights_gib", "activation_peak_gib", "non_torch_gib", "kv_cache_gib", "kv_tokens",
            "max_model_len", "gpu_total_gib", "gpu_memory_utilization")
    return row["status"] == "ok" and all(number(row[k]) is not None for k in keys) \
        and row_version(row) is not None


def compare() -> list[dict[str, object]]:
    catalog = load_catalog()
    results = []
    for row in load_rows():
        if not usable(row):
            continue
        version = row_version(row) or ""
        if version.count(".") == 1:
            version += ".0"
        report = read_startup(start_up_log(row, version))
        total = _bytes(number(row["gpu_total_gib"]))
        measured = measured_from(report, utilization=float(row["gpu_memory_utilization"]),
                                 gpu_total_bytes=total, gpu_used_bytes=None)
        request = request_for(row)
        metadata = catalog_metadata(request.model, catalog)
        if metadata is None:
            continue
        key = make_key(model=request.model, revision=None, vllm_version=version,
                       gpu_name=row["gpu"], tensor_parallel_size=request.tensor_parallel_size,
                       dtype=request.dtype, quantization=request.quantization,
                       kv_cache_dtype=request.kv_cache_dtype, max_num_seqs=None,
                       max_num_batched_tokens=None, enforce_eager=request.enforce_eager)
        profile = profile_of(measured, key, measured_at=0.0, source=f"row {row['row_id']}",
                             graphs_in_budget=graphs_counted(version, by_gardenctl=False))
        if profile is None:
            continue
        for concurrency in CONCURRENCY:
            asked = replace(request, min_concurrency=concurrency)
            estimate = estimate_memory(asked, metadata)
            sized = size_from_profile(estimate, profile)
            tokens = round(estimate.kv_cache.bytes / estimate.kv_bytes_per_token)
            need = needed(row, version, tokens)
            results.append({
                "row": row["row_id"], "model": request.model, "version": version,
                "concurrency": concurrency, "needed": need,
                "profile_error": sized.budget_bytes / need - 1,
                "estimate_error": estimate.budget_bytes / need - 1,
            })
    return results


def _pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def main() -> int:
    results = compare()
    print(f"{'row':>4}  {'model':<46} {'vLLM':<7} {'conc':>4}  {'needed':>9}  "
          f"{'profile':>8}  {'estimate':>8}")
    for r in results:
        print(f"{r['row']:>4}  {str(r['model'])[:46]:<46} {r['version']:<7} "
              f"{r['concurrency']:>4}  {r['needed'] / GiB:>6.2f} GiB  "
              f"{_pct(float(r['profile_error'])):>8}  {_pct(float(r['estimate_error'])):>8}")
    for name in ("profile", "estimate"):
        errors = [float(r[f"{name}_error"]) for r in results]
        print(f"{name:>8}: {len(errors)} requests, median |error| "
              f"{statistics.median(abs(e) for e in errors) * 100:.2f}%, worst under "
              f"{_pct(min(errors))}, worst over {_pct(max(errors))}")
    by_version: dict[str, list[float]] = {}
    for r in results:
        by_version.setdefault(str(r["version"]), []).append(float(r["profile_error"]))
    for version, errors in sorted(by_version.items()):
        print(f"  profile, vLLM {version}: {len(errors)} requests, worst |error| "
              f"{max(abs(e) for e in errors) * 100:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
