"""dtype and quantization against the compute capability of the GPUs a worker may run on.

The capability comes from the GPU's name (gardenctl/data/gpu-compute-capability.json, from
NVIDIA's CUDA GPUs page); a name that is not in the table is not checked. vLLM's rules:

- bfloat16 needs compute capability 8.0: the CUDA platform's `check_if_supports_dtype`
  (vllm/platforms/cuda.py) refuses `--dtype bfloat16` before 8.0 ("Bfloat16 is only supported on
  GPUs with compute capability of at least 8.0 ... use float16 instead"); with `dtype: auto`
  recent releases fall back to float16 (`_resolve_auto_dtype`, vllm/config/model.py), older
  ones refuse too: a warning;
- each quantization method's `get_min_capability()` (vllm/model_executor/layers/quantization/
  *.py), checked by `_verify_quantization` / the model loader ("The quantization method X is not
  supported for the current GPU. Minimum capability: N. Current capability: M.");
- fp8 computes natively from 8.9 (Ada, Hopper); from 8.0 vLLM runs fp8 checkpoints weight-only
  through its Marlin kernel (`marlin_utils_fp8.py`: "Your GPU does not have native support for
  FP8 computation ... Weight-only FP8 compression will be used"), a warning, not an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources

from gardenctl.preflight.findings import Finding, error, warning

BF16_MIN = 8.0
FP8_NATIVE_MIN = 8.9
# get_min_capability() of vLLM's quantization methods (x 10 in vLLM: 75 means 7.5).
MIN_CAPABILITY: dict[str, float] = {
    "awq": 7.5,
    "awq_marlin": 8.0,
    "gptq": 6.0,
    "gptq_marlin": 8.0,
    "gptq_marlin_24": 8.0,
    "marlin": 8.0,
    "fp8": 8.0,  # 8.0-8.8: weight-only through Marlin (warned below)
    "fbgemm_fp8": 8.0,
    "modelopt": 8.9,
    "ptpc_fp8": 9.4,
    "bitsandbytes": 7.0,
    "compressed-tensors": 7.0,
    "gguf": 6.0,
    "experts_int8": 8.0,
    "mxfp4": 8.0,
}
_WORD = re.compile(r"[a-z0-9]+")


@lru_cache(maxsize=1)
def capability_table() -> Mapping[tuple[str, ...], float]:
    text = resources.files("gardenctl.data").joinpath("gpu-compute-capability.json").read_text()
    gpus = json.loads(text)["gpus"]
    return {tuple(_WORD.findall(name)): float(cc) for name, cc in gpus.items()}


def compute_capability(gpu_name: str) -> float | None:
    """The compute capability of a GPU called ``gpu_name``, or None when it is not known."""
    words = tuple(_WORD.findall(gpu_name.lower()))
    best: tuple[int, float] | None = None
    for key, cc in capability_table().items():
        n = len(key)
        if any(words[i:i + n] == key for i in range(len(words) - n + 1)):
            if best is None or n > best[0]:
                best = (n, cc)
    return best[1] if best else None


def check_hardware(dtype: str, config_dtype: str | None, quantization: str | None,
                   gpu_names: Sequence[str]) -> list[Finding]:
    """``dtype`` as declared, ``config_dtype`` config.json's torch_dtype, ``quantization`` the
    method vLLM will use (declared, else config.json's quant_method), against the weakest of
    ``gpu_names`` that the table knows."""
    known = sorted({(cc, name) for name in gpu_names
                    if (cc := compute_capability(name)) is not None})
    if not known:
        return []
    best = _on_gpu(dtype, config_dtype, quantization, *known[-1])
    if known[0][0] == known[-1][0]:
        return best
    # A mixed fleet: what only the weaker GPUs cannot run is a warning (placement may put the
    # worker there; pin it to a capable node).
    weakest = _on_gpu(dtype, config_dtype, quantization, *known[0])
    refused = {f.field for f in best if f.is_error}
    downgraded = [warning(f.field, f"{f.message} (placement may put the worker there)",
                          hint=f"pin the model to a node with capable GPUs; {f.hint}")
                  for f in weakest if f.field not in refused]
    return best + downgraded


def _on_gpu(dtype: str, config_dtype: str | None, quantization: str | None, cc: float,
            gpu: str) -> list[Finding]:
    where = f"{gpu} (compute capability {cc:.1f})"
    findings: list[Finding] = []
    if cc < BF16_MIN:
        if dtype in ("bfloat16", "bf16"):
            findings.append(error("dtype", f"dtype bfloat16 needs compute capability "
                                  f"{BF16_MIN:.1f}; {where} has not: vLLM refuses to start",
                                  hint="set dtype: float16"))
        elif dtype == "auto" and config_dtype == "bfloat16":
            findings.append(warning("dtype", f"the model is bfloat16 (config.json torch_dtype) "
                                    f"and {where} cannot compute in bfloat16: recent vLLM "
                                    "releases fall back to float16, older ones refuse",
                                    hint="set dtype: float16"))
    method = (quantization or "").lower().replace("_", "-") if quantization else None
    if method is not None:
        key = method.replace("-", "_") if method != "compressed-tensors" else method
        need = MIN_CAPABILITY.get(key)
        if need is not None and cc < need:
            findings.append(error("quantization", f"quantization {quantization} needs compute "
                                  f"capability {need:.1f} (vLLM's get_min_capability); {where} "
                                  "has not: vLLM refuses to start",
                                  hint="use a GPU that has it, or a checkpoint quantized "
                                  "another way (e.g. AWQ or GPTQ)"))
        elif key == "fp8" and cc < FP8_NATIVE_MIN:
            findings.append(warning("quantization", f"fp8 computes natively from compute "
                                    f"capability {FP8_NATIVE_MIN:.1f}; on {where} vLLM runs it "
                                    "weight-only through its Marlin kernel (slower for "
                                    "compute-heavy loads)",
                                    hint="expected on Ampere; use an Ada or Hopper GPU for "
                                    "native fp8"))
    return findings
