"""`gardenctl estimate MODEL`: the itemised memory estimate of one model, with sources.

Reads the model's metadata (local folder, offline Hugging Face cache, or the built-in catalog),
estimates per GPU, and with --gpu-memory also says which --gpu-memory-utilization to pass to
vLLM and how much of the GPU the worker then claims.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gardenctl.cli.options import echo_json, output_format
from gardenctl.errors import GardenError, ModelMetadataError
from gardenctl.estimate.core import ESTIMATORS
from gardenctl.units import GiB

POLICIES = ("fit", "tiered")
ITEMS = (  # (MemoryEstimate attribute, JSON key, label in the text table)
    ("weights", "weights", "weights"),
    ("kv_cache", "kv_cache", "KV cache"),
    ("activation", "activation", "activation"),
    ("cuda_graph", "cuda_graph", "CUDA graphs"),
    ("non_torch", "non_torch", "non-torch"),
)


@click.command("estimate")
@click.argument("model")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hugging Face model.")
@click.option(
    "--max-model-len",
    type=click.IntRange(min=16),
    default=None,
    help="Context length; default: the model's own limit from config.json.",
)
@click.option(
    "--tp",
    "--tensor-parallel-size",
    "tp",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Tensor-parallel size (GPUs per worker).",
)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="auto, bfloat16, float16, float32 (as vLLM's --dtype).",
)
@click.option("--quantization", default=None, help="As vLLM's --quantization (e.g. fp8, awq).")
@click.option(
    "--kv-cache-dtype", default="auto", show_default=True, help="auto, fp8, fp8_e5m2, ..."
)
@click.option(
    "--min-concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Sequences of max_model_len the KV cache must hold.",
)
@click.option(
    "--max-num-batched-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Drives the activation peak; default: assume 8192 (vLLM's H100 default).",
)
@click.option(
    "--max-num-seqs",
    type=click.IntRange(min=1),
    default=None,
    help="Sequences sampled at once; default: assume 1024 (vLLM's H100 default).",
)
@click.option("--enforce-eager", is_flag=True, help="No CUDA graphs (as vLLM's --enforce-eager).")
@click.option(
    "--gpu-memory",
    default=None,
    help="GPU size (e.g. 80GiB, 24GB): also compute --gpu-memory-utilization.",
)
@click.option(
    "--vllm-version",
    default=None,
    metavar="X.Y.Z",
    help="The vLLM release that will run (its overheads differ); default: assume the newest "
    "modelled release, with a warning.",
)
@click.option("--estimator", type=click.Choice(ESTIMATORS), default="gardenctl", show_default=True)
@click.option(
    "--policy",
    type=click.Choice(POLICIES),
    default=None,
    help="Utilization policy; default: tiered for model-garden, fit otherwise.",
)
@click.option(
    "--safety-margin",
    type=float,
    default=0.05,
    show_default=True,
    help="Fraction added to the budget by the fit policy.",
)
@click.option(
    "--allow-network",
    is_flag=True,
    help="Let huggingface_hub fetch config.json and safetensors headers (never weights).",
)
@output_format("text", "json")
def estimate(
    model: str,
    revision: str | None,
    max_model_len: int | None,
    tp: int,
    dtype: str,
    quantization: str | None,
    kv_cache_dtype: str,
    min_concurrency: int,
    max_num_batched_tokens: int | None,
    max_num_seqs: int | None,
    enforce_eager: bool,
    gpu_memory: str | None,
    vllm_version: str | None,
    estimator: str,
    policy: str | None,
    safety_margin: float,
    allow_network: bool,
    output: str,
) -> None:
    """Itemised GPU memory estimate of MODEL (a local folder or a Hugging Face id), per GPU."""
    from gardenctl.estimate import EstimateRequest, estimate_memory, read_model_metadata
    from gardenctl.estimate.metadata import looks_like_path

    if not model.strip():
        raise GardenError("MODEL is empty: give a local folder or a Hugging Face id")
    gpu_total = _parse_gpu_memory(gpu_memory)
    if vllm_version is not None:
        from gardenctl.estimate.releases import parse_version

        try:
            parse_version(vllm_version)
        except GardenError as exc:
            raise GardenError(f"--vllm-version: {exc}") from None
    if safety_margin < 0:
        raise GardenError(f"--safety-margin must be >= 0, got {safety_margin}")
    if looks_like_path(model) and not Path(model).expanduser().is_dir():
        raise ModelMetadataError(
            f"model folder {model} does not exist; give an existing folder (with config.json) "
            "or a Hugging Face id such as Qwen/Qwen2.5-7B-Instruct"
        )
    request = EstimateRequest(
        model=model,
        revision=revision,
        max_model_len=max_model_len,
        tensor_parallel_size=tp,
        dtype=dtype,
        quantization=quantization,
        kv_cache_dtype=kv_cache_dtype,
        min_concurrency=min_concurrency,
        enforce_eager=enforce_eager,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        vllm_version=vllm_version,
    )
    metadata = read_model_metadata(model, revision, allow_network=allow_network)
    result = estimate_memory(request, metadata, estimator)
    chosen = policy or ("tiered" if estimator == "model-garden" else "fit")
    sizing = _size_for_gpu(result, gpu_total, chosen, safety_margin) if gpu_total else None
    document = estimate_document(result, metadata.notes, sizing)
    if output == "json":
        echo_json(document)
    else:
        click.echo(render_text(document))


def estimate_document(result: Any, notes: tuple[str, ...], sizing: dict | None) -> dict[str, Any]:
    """The `estimate -o json` document (format_version 1; fields are only ever added)."""
    from gardenctl.estimate import ESTIMATE_FORMAT_VERSION

    per_gpu: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for attribute, key, _ in (*ITEMS, ("cuda_context", "cuda_context", "")):
        item = getattr(result, attribute)
        per_gpu[f"{key}_bytes"] = item.bytes
        sources[key] = item.source
    per_gpu["overhead_bytes"] = result.overhead_bytes
    per_gpu["budget_bytes"] = result.budget_bytes
    per_gpu["outside_budget_bytes"] = result.outside_budget_bytes
    per_gpu["total_bytes"] = result.total_bytes
    per_gpu["sources"] = sources
    document: dict[str, Any] = {
        "format_version": ESTIMATE_FORMAT_VERSION,
        "model": result.model,
        "estimator": result.estimator,
        "tensor_parallel_size": result.tensor_parallel_size,
        "max_model_len": result.max_model_len,
        "max_model_len_source": result.max_model_len_source,
        "min_concurrency": result.min_concurrency,
        "vllm_version": result.vllm_version,
        "vllm_range": result.vllm_range,
        "cuda_graphs_in_budget": result.graphs_in_budget,
        "kv_bytes_per_token": result.kv_bytes_per_token,
        "kv_bytes_per_token_source": result.kv_bytes_per_token_source,
        "per_gpu": per_gpu,
        "warnings": list(result.warnings),
        "notes": list(notes),
    }
    if sizing:
        document.update(sizing)
    return document


def render_text(doc: dict[str, Any]) -> str:
    gpu = doc["per_gpu"]
    sources = gpu["sources"]
    lines = [
        f"Memory estimate for {doc['model']} (estimator {doc['estimator']}), per GPU, "
        f"tensor parallel {doc['tensor_parallel_size']}",
        f"  max_model_len  {doc['max_model_len']:,} ({doc['max_model_len_source']})",
        f"  KV per token   {doc['kv_bytes_per_token']:,} B ({doc['kv_bytes_per_token_source']})",
        f"  sequences      {doc['min_concurrency']} (min_concurrency)",
        f"  vLLM           {doc['vllm_version']} (modelled as {doc['vllm_range']}; CUDA graphs "
        + ("inside" if doc["cuda_graphs_in_budget"] else "OUTSIDE")
        + " the --gpu-memory-utilization budget)",
        "",
        f"  {'item':<14} {'size':>10}  source",
    ]
    inside = doc["cuda_graphs_in_budget"]
    for _, key, label in ITEMS:
        if key != "cuda_graph" or inside:
            lines.append(_row(label, gpu[f"{key}_bytes"], sources[key]))
    lines.append(_row("= budget", gpu["budget_bytes"], "what --gpu-memory-utilization must cover"))
    if not inside:
        lines.append(_row("CUDA graphs", gpu["cuda_graph_bytes"], sources["cuda_graph"]))
    lines.append(_row("CUDA context", gpu["cuda_context_bytes"], sources["cuda_context"]))
    lines.append(_row("= total", gpu["total_bytes"], "footprint on each GPU"))
    if doc["warnings"]:
        lines += ["", "warnings:"] + [f"  ! {w}" for w in doc["warnings"]]
    if doc["notes"]:
        lines += ["", "notes:"] + [f"  - {n}" for n in doc["notes"]]
    if "gpu_total_bytes" in doc:
        total = doc["gpu_total_bytes"]
        utilization = doc["gpu_memory_utilization"]
        how = doc["policy"] + (
            f", safety margin {doc['safety_margin']:.0%}" if doc["policy"] == "fit" else ""
        )
        lines += ["", f"on a {_size(total)} GPU (policy {how}):"]
        lines.append(f"  --gpu-memory-utilization {utilization:g}")
        outside = f"{_size(gpu['cuda_context_bytes'])} CUDA context"
        if not inside:
            outside += f" + {_size(gpu['cuda_graph_bytes'])} CUDA graphs"
        lines.append(
            f"  claim {_size(doc['claim_bytes'])} = {utilization:g} x {_size(total)} + {outside}"
        )
        if not doc["fits"]:
            lines.append(f"  ! does NOT fit: the worker needs more than the GPU's {_size(total)}")
    return "\n".join(lines)


def _size_for_gpu(result: Any, gpu_total: int, policy: str, margin: float) -> dict[str, Any]:
    from gardenctl.placement.utilization import claim_bytes, fit_utilization, tiered_utilization

    if policy == "tiered":
        utilization = tiered_utilization(result, gpu_total)
    else:
        utilization = fit_utilization(result, gpu_total, margin)
    claim = claim_bytes(utilization, gpu_total, result.outside_budget_bytes)
    sizing: dict[str, Any] = {
        "gpu_total_bytes": gpu_total,
        "policy": policy,
        "gpu_memory_utilization": utilization,
        "claim_bytes": claim,
        "fits": utilization <= 1.0 and claim <= gpu_total,
    }
    if policy == "fit":
        sizing["safety_margin"] = margin
    return sizing


def _parse_gpu_memory(value: str | None) -> int | None:
    if value is None:
        return None
    from gardenctl.units import VALID_SIZE_HINT, parse_size

    try:
        size = parse_size(value)
    except ValueError as exc:
        raise GardenError(f"--gpu-memory: {exc}") from None
    if size <= 0:
        raise GardenError(f"--gpu-memory must be positive: expected {VALID_SIZE_HINT}")
    return size


def _row(label: str, n_bytes: int, source: str) -> str:
    return f"  {label:<14} {_size(n_bytes):>10}  {source}"


def _size(n_bytes: int) -> str:
    return f"{n_bytes / GiB:.2f} GiB"
