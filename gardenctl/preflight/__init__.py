"""Pre-flight checks: what vLLM would refuse at start-up, read from the model's config.json.

`check_model` is pure: a model's garden settings, its metadata (read at the edge by
gardenctl.estimate.read_model_metadata), the names of the GPUs it may run on, the vLLM release
that will run it, the names in its environment and, where the Hub was asked, its answer. Each
concern is its own module (docs/preflight.md gives the rules with their vLLM sources):
sanity (config.json numbers in range), reference (model and quantization names), context
(max_model_len), parallelism (tensor_parallel_size), hardware (dtype, quantization vs compute
capability), architectures (the release's registry), access (gated repositories).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gardenctl.estimate.architecture import read_architecture
from gardenctl.estimate.types import ModelMetadata
from gardenctl.preflight.access import HubAnswer, HubInfo, ask_hub, check_gated, hub_available
from gardenctl.preflight.architectures import check_architecture
from gardenctl.preflight.context import check_context
from gardenctl.preflight.findings import Finding
from gardenctl.preflight.hardware import check_hardware, compute_capability
from gardenctl.preflight.parallelism import check_parallelism
from gardenctl.preflight.reference import check_quantization_name, check_reference
from gardenctl.preflight.sanity import check_sane
from gardenctl.spec.models import ModelSpec


def check_model(model: ModelSpec, metadata: ModelMetadata, gpu_names: Sequence[str],
                vllm_version: str | None, version_assumed: bool, env_names: frozenset[str],
                hub: HubAnswer | None = None) -> list[Finding]:
    """Every pre-flight finding of ``model``: errors first, in field order."""
    findings = check_reference(model.model, metadata, hub)
    findings += check_quantization_name(model.quantization)
    config = metadata.config
    if config is not None:
        where = metadata.config_source or "config.json"
        sane = check_sane(config, where)
        if sane:
            return findings + sane  # nothing else can be trusted
        arch = read_architecture(config)
        findings += check_context(model.max_model_len, config, where, model.env)
        findings += check_parallelism(model.tensor_parallel_size, arch)
        method = model.quantization or _config_method(arch.quantization)
        findings += check_hardware(model.dtype, arch.torch_dtype, method, gpu_names)
        findings += check_architecture(config, vllm_version, version_assumed)
    if hub is not None and hub.exists:
        findings += check_gated(model.model, hub, env_names)
    return sorted(findings, key=lambda f: not f.is_error)


def _config_method(quantization: Mapping[str, Any] | None) -> str | None:
    """vLLM's name of a checkpoint's quantization_config (compressed-tensors keeps its dash)."""
    method = (quantization or {}).get("quant_method")
    return str(method) if method else None


__all__ = [
    "Finding",
    "HubAnswer",
    "HubInfo",
    "ask_hub",
    "check_model",
    "compute_capability",
    "hub_available",
]
