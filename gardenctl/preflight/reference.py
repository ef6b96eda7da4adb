"""A model reference that resolves nowhere, and quantization names vLLM does not know."""

from __future__ import annotations

import difflib

from gardenctl.estimate.metadata import HF_ID, looks_like_path
from gardenctl.estimate.types import ModelMetadata
from gardenctl.preflight.access import HubAnswer
from gardenctl.preflight.findings import Finding, error, warning

# `--quantization` choices of vLLM's QUANTIZATION_METHODS (vllm/model_executor/layers/
# quantization/__init__.py), the union over 0.6-0.13: a name outside it is refused by the
# argument parser ("argument --quantization/-q: invalid choice").
QUANTIZATION_METHODS = frozenset({
    "aqlm", "awq", "awq_marlin", "awq_triton", "auto-round", "bitblas", "bitsandbytes",
    "compressed-tensors", "deepspeedfp", "experts_int8", "fbgemm_fp8", "fp8", "fp_quant",
    "gguf", "gptq", "gptq_bitblas", "gptq_marlin", "gptq_marlin_24", "hqq", "inc", "ipex",
    "marlin", "modelopt", "modelopt_fp4", "moe_wna16", "mxfp4", "neuron_quant", "petit_nvfp4",
    "ptpc_fp8", "qqq", "quark", "rtn", "torchao", "tpu_int8",
})


def check_quantization_name(name: str | None) -> list[Finding]:
    if name is None or name in QUANTIZATION_METHODS:
        return []
    close = difflib.get_close_matches(name.lower(), sorted(QUANTIZATION_METHODS), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "unset it to use the checkpoint's own"
    return [error("quantization", f"unknown quantization {name!r}: vLLM's --quantization "
                  "accepts none such", hint=hint)]


def check_reference(ref: str, metadata: ModelMetadata, hub: HubAnswer | None) -> list[Finding]:
    """Errors where the model certainly cannot be found; a warning where it was not checked."""
    if metadata.config is not None:
        return []
    if looks_like_path(ref):  # a warning: the path may exist where workers run, not here
        return [warning("model", f"model {ref!r} is not a folder on this machine: vLLM will "
                        "not find it unless it exists where the worker runs",
                        hint="fix the path (relative paths are from the garden file's folder)")]
    if not HF_ID.match(ref):  # certain too, but kept a warning: see docs/preflight.md
        return [warning("model", f"model {ref!r} is neither a local folder nor a Hugging Face "
                        "id (org/name): vLLM will not find it", hint="write a Hugging Face id "
                        "or a path")]
    if hub is not None and hub.exists is False:
        return [error("model", f"model {ref!r} resolves nowhere: not a local folder, not in "
                      f"the Hugging Face cache, and the Hub says {hub.detail or 'not found'}",
                      hint="check the id's spelling, `revision:`, and the token of a private "
                      "repository")]
    if hub is None or hub.exists:
        return []  # not asked (the estimate already says no config.json was found), or there
    return [warning("model", f"model {ref!r} has no config.json here: not a local folder and "
                    f"not in the Hugging Face cache, and the Hub did not answer ({hub.detail});"
                    " it could not be checked",
                    hint="download it first, or check the network and HF_ENDPOINT")]
